"""Command line of the alternating-training pipeline (placeholder until the stages land)."""
import sys

if __name__ == "__main__":
    print("pipeline.py: the stages package is not built yet; the steps stage1, p1, stage2, stage3, p2, stage4 "
          "and eval are still missing.", file=sys.stderr)
    sys.exit(0)
