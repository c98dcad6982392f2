"""Crash safety: kill -9 a process mid-burst of receipts; every receipt whose record() returned
(its id was printed) is in the ledger, and the chain verifies. Repeated on the same ledger, so
restarting after a crash is exercised too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from openlora.attribution.ledger import Ledger

WRITER = textwrap.dedent('''
    import sys, threading
    sys.path.insert(0, sys.argv[3])
    from attr_helpers import event, manifest_dict
    from openlora.attribution import AttributionService, DefaultPolicy, NodeIdentity

    svc = AttributionService(sys.argv[1], NodeIdentity.from_key(b"\\x42" * 32),
                             {"ad1": manifest_dict()}, base_model_id="tiny-llama",
                             default_policy=DefaultPolicy(1, 2), epoch_size=25)
    tag = sys.argv[2]
    out = threading.Lock()

    def work(k):
        i = 0
        while True:
            r = svc.record(event(request_id=f"{tag}-{k}-{i}", adapters=() if i % 2 else (("ad1", 1.0),)))
            with out:  # printed only after record() returned, i.e. after the commit
                sys.stdout.write(r.request_id + "\\n")
                sys.stdout.flush()
            i += 1

    for k in range(3):
        threading.Thread(target=work, args=(k,), daemon=True).start()
    threading.Event().wait()
''')


def test_kill_9_mid_burst_loses_no_committed_receipt(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ledger_path = str(tmp_path / "crash.db")
    here = os.path.dirname(__file__)
    printed: list[str] = []
    for round_, stop_after in enumerate([40, 97, 163]):
        proc = subprocess.Popen(
            [sys.executable, str(script), ledger_path, f"r{round_}", here],
            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(here)),
        )
        got = 0
        for line in proc.stdout:
            printed.append(line.strip())
            got += 1
            if got >= stop_after:
                break
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: the other threads are signing/committing
        proc.wait(timeout=30)
        # Lines the child wrote before dying were also committed before being written.
        printed.extend(x.strip() for x in proc.stdout.read().splitlines() if x.strip())
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        led = Ledger(ledger_path)
        try:
            assert led.verify() is None
            missing = [rid for rid in printed if led.get(rid) is None]
            assert not missing, f"round {round_}: committed receipts lost: {missing[:5]}"
            assert len(led) >= len(printed)
        finally:
            led.close()
