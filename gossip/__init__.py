"""gossip: SWIM membership compatible with HashiCorp memberlist, and the replicated flow table."""
