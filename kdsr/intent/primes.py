"""Prime numbers for Maglev table sizes.

A Maglev lookup table must have a prime size so that every backend's
permutation (offset + j * skip mod M) visits every slot.  The intent checks a
user's ``table_size`` with ``is_prime``; compile picks a size with
``next_prime``.  Trial division is plenty: table sizes stay below ~10^6.
"""

from __future__ import annotations


def is_prime(n: int) -> bool:
    """True when n is a prime number (n <= 1 is not)."""
    if n < 2:
        return False
    if n < 4:
        return True  # 2 and 3
    if n % 2 == 0 or n % 3 == 0:
        return False
    # Every prime above 3 is 6k - 1 or 6k + 1, so only those divisors matter.
    d = 5
    while d * d <= n:
        if n % d == 0 or n % (d + 2) == 0:
            return False
        d += 6
    return True


def next_prime(n: int) -> int:
    """The smallest prime >= n (n itself when n is prime; 2 for n <= 2)."""
    if n <= 2:
        return 2
    candidate = n if n % 2 else n + 1  # even numbers above 2 are never prime
    while not is_prime(candidate):
        candidate += 2
    return candidate
