"""The fleet: a follower's upstream sidecar (its channel, its Watch as a change source)."""
