"""Value heads shipped with piscale (``manifest.json``: file, sha256, backbone,
the policy whose rollouts trained it, and the command, data hash and seed
that made it). ``piscale.rewards.value.shipped_head_path`` checks a file
against its hash before it is used; the reward spec ``value`` loads the
``default`` head."""
