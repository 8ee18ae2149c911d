from kdsr.cli import run

run()
