"""`return_freed_memory_to_os` (`Pipeline.enable_low_cpu_memory`, `ldmkit sample --low-cpu-memory`): freed
tensors leave the process's resident memory at once instead of staying in glibc's heap.

Each case runs in its own Python process, since the switch changes the allocator of the whole process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ldmkit.nn.host_memory import _libc, return_freed_memory_to_os

SCRIPT = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    import torch

    def resident_mib():
        return int(re.search(r"VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

    exec(sys.argv[1])  # how the switch is turned on, or nothing
    a = torch.ones(2**21)  # 8 MiB, mmapped; freeing it raises glibc's own threshold to 8 MiB
    del a
    blocks = [torch.ones(2**21) for _ in range(20)]  # 160 MiB, from the heap once the threshold has moved
    before = resident_mib()
    del blocks[:-1]  # the last block stays in use, so the heap cannot shrink from its top
    print(before - resident_mib())
""")

needs_glibc = pytest.mark.skipif(_libc() is None or not sys.platform.startswith("linux"),
                                 reason="glibc's malloc on Linux")


def _released_mib(switch_on: str) -> float:
    """MiB that left resident memory when 152 MiB of tensors were freed, in a fresh process that first ran
    `switch_on`."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, switch_on], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


@needs_glibc
def test_freed_tensors_leave_resident_memory_only_with_the_switch():
    assert _released_mib("") < 16  # 152 MiB freed by torch, still resident
    on = "from ldmkit.nn.host_memory import return_freed_memory_to_os\nassert return_freed_memory_to_os()"
    assert _released_mib(on) > 140  # 19 blocks of 8 MiB given back


@needs_glibc
def test_the_pipeline_switch_reaches_the_allocator():
    assert _released_mib("from ldmkit.pipeline.switches import SpeedSwitches\n"
                         "SpeedSwitches.enable_low_cpu_memory(SpeedSwitches())") > 140


def test_ldmkit_sample_with_low_cpu_memory_makes_the_same_images(tiny_run, tmp_path):
    pictures = []
    for flag in ([], ["--low-cpu-memory"]):
        out = tmp_path / f"grid{len(flag)}.png"
        run = subprocess.run([sys.executable, "-m", "ldmkit.cli.main", "sample", "--checkpoint", str(tiny_run),
                              "--class", "3", "--n", "2", "--steps", "3", "--seed", "5", "--out", str(out), *flag],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        pictures.append(np.asarray(Image.open(out)))
    assert pictures[0].shape == pictures[1].shape and (pictures[0] == pictures[1]).all()


@pytest.mark.parametrize("bad", [0, 100, 2**30, 1.5, "128k"])
def test_a_threshold_outside_glibcs_range_is_refused(bad):
    with pytest.raises(ValueError, match="threshold_bytes"):
        return_freed_memory_to_os(bad)
