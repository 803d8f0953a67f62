"""First (GGUF dequantization + cache write) vs cached load time of the default model.

    OMP_WAIT_POLICY=PASSIVE python bench/model_load.py

Uses a fresh temporary INNSTEER_CACHE, so the first load really dequantizes.
"""

import os
import sys
import tempfile
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["INNSTEER_CACHE"] = cache
        from innsteer.hf.models import load_model

        times = []
        for _ in range(3):
            start = time.perf_counter()
            lm = load_model()
            times.append(time.perf_counter() - start)
            del lm
        print(
            f"first load (dequantize GGUF, write cache): {times[0]:.1f} s; "
            f"cached loads: {', '.join(f'{t:.2f}' for t in times[1:])} s"
        )


if __name__ == "__main__":
    main()
