"""FPO Axolotl plugin."""
X = 1
