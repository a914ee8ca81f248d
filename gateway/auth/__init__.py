"""Who may do what at the gateway: bearer tokens (tokens.py), the static policy file
(policy.py), the decision for one call (access.py) and the flags that configure them
(config.py). README.md, "The gateway's authentication flags", has the user's view."""
