"""conet, the guests' virtual Ethernet: frame policy and the per-agent switch that spans the pool."""
