"""Run a command and log its VmHWM/VmRSS every few seconds (for runs too long to wait out)."""

import subprocess
import sys
import time
from pathlib import Path


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = value.strip()
    return fields


if __name__ == "__main__":
    log = Path(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1 :]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("w") as out:
        out.write(f"command: {' '.join(command)}\n")
        while process.poll() is None:
            try:
                out.write(f"{time.perf_counter() - started:8.1f}s {status(process.pid)}\n")
            except FileNotFoundError:
                break
            out.flush()
            time.sleep(5)
        out.write(f"exit {process.returncode} after {time.perf_counter() - started:.1f}s\n")
