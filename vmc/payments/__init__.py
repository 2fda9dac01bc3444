"""Payment methods behind one interface the vend cycle uses (``base.py``): cash (``cash.py``)
and QR e-wallet orders (``qr.py``); a cashless card reader fits the same shape. See
docs/payments.md."""
