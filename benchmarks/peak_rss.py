"""Run a command; print its peak resident set size (largest process in its tree) as JSON on stdout."""

import json
import resource
import subprocess
import sys

if __name__ == "__main__":
    command = sys.argv[sys.argv.index("--") + 1 :]
    code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=sys.stderr, check=False).returncode
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak_rss_mb": round(peak_kb / 1024, 1), "returncode": code}))
    sys.exit(code)
