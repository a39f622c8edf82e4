"""`svp train-sam`: segment-anything's own architecture at small size, trained on SynthRef's
instance masks with SAM's promptable objective, saved as a SAM-format checkpoint."""
