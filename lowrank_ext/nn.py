class LowRankLinear: pass
