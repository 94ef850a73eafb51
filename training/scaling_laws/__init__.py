"""Fit the token-horizon LR law and the multilingual family law from small runs, and feed them back
(`optim.lr: auto` with `optim.lr_law`, data `ratios: from FILE`)."""
