"""Who may do what at the gateway: bearer tokens (tokens.py), the static policy file
(policy.py), and the decision for one call (access.py). See docs/design.md, "Authentication and
authorization at the gateway"."""
