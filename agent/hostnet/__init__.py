"""The host side of guest networks: the networks an agent's config names, and the tap or
macvtap devices it creates on them for its VMs."""
