"""Attacks on a running federation, as an untrusted client would try them (``ops.bench attacks``, the tests).

``attacks``: the attack matrix (no credentials, a stolen transmitter's, a gate's, a user's) with the legitimate
questions that run meanwhile; ``fuzz``: mutated copies of every message seen, republished by identities allowed
to publish there; ``sniff``: what an identity can read, and which secrets it saw; ``raw``: a NATS client that
never reads (a slow consumer).
"""
