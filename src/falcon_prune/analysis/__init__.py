"""Model analysis: what a network costs (the cost model and its MAC formulas), the
independent recount, its channel structure and surgery, masks, layer timings."""
