"""kdsr: Direct Server Return load balancing on plain Linux, from one intent file.

Layers, bottom first; a module imports only from its own layer and those
named after it (tests/test_layers.py holds the code to this table, reading
every import, those inside functions too):

=============  ==============================================  =============================
layer          modules                                         may import
=============  ==============================================  =============================
base           errors, wording, files, collector, faults,      (nothing of kdsr)
               privilege, naming, memo
intent         intent/ (load, schema, rules, values, model)    base
model          model, model_xdp, maglev, fragment_text,        base
               bird_text, keepalived_text
compile        compile/ (pure: Intent -> Desired, and the      base, intent, model
               effective intent, probe targets, the cache)
kernel         kernel/ (a backend per subsystem, each with     base, model
               its fake; see kdsr/kernel/__init__.py)
diff           diff                                            base, model
runtime state  health/state, health/status, health/control     base, kernel
plan           plan_format, service_view, saved_plan           base, model, compile, kernel,
                                                               diff
apply          apply, step, ipvs_apply, vrrp_apply, receipt    base, model, kernel, diff,
                                                               runtime state
operations     operations                                      all of the above
daemon         health/, commands/                              all of the above
cli            cli, __main__                                   anything
=============  ==============================================  =============================

No import cycles between modules, and no kernel backend imports another's
modules (nft, links, ipvs, bird, keepalived, sysctl, xdp).  An import inside a function is allowed
only to keep a command's start-up short (jsonschema, the daemon, the real
kernel, libbpf), and tests/test_layers.py lists each with its reason.
"""
