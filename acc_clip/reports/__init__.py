"""Reading runs back: loss curves (curves.py), plots (plot.py), the loss-curve check (compare_loss.py)."""
