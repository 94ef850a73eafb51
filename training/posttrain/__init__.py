"""Continue-training a reasoning variant: chat formatting with loss masks, SFT packing, DPO / LN-DPO."""
