"""Model analysis: what a network costs (the cost model and its MAC formulas), the
independent recount, its channel structure and surgery, masks, layer timings, and its
repeated blocks (what the layer-wise loss model runs one at a time)."""
