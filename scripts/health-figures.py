#!/usr/bin/env python3
"""Figures for cluster health, measured with real processes on loopback.

  scripts/health-figures.py detect [--kills 10]    median time to mark a killed node OFFLINE
                                                  (default settings: heartbeat 1 s, timeout 5 s)
  scripts/health-figures.py soak [--minutes 10]    false OFFLINE marks among 3 live nodes while
                                                  both cores are kept busy

Uses target/release/peerconf (build it first). Prints one JSON line per figure.
"""
import json, os, signal, socket, subprocess, sys, tempfile, time

PC = os.environ.get("PEERCONF_BIN", os.path.join(os.path.dirname(__file__), "..", "target", "release", "peerconf"))

def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return f"127.0.0.1:{p}"

def cli(api, *args):
    return subprocess.run([PC, "--api", f"http://{api}", *args], capture_output=True, text=True, timeout=30)

class Cluster:
    def __init__(self, n):
        self.tmp = tempfile.mkdtemp(prefix="peerconf-health-")
        self.nodes = []
        for i in range(n):
            d = os.path.join(self.tmp, f"n{i+1}"); api, ipc = free(), free()
            if i == 0:
                subprocess.run([PC, "init", "--data-dir", d, "--name", f"n{i+1}", "--api-listen", api, "--ipc-listen", ipc], check=True, capture_output=True)
            else:
                tok = cli(self.nodes[0]["api"], "token", "create").stdout.strip().splitlines()[-1]
                subprocess.run([PC, "join", "--data-dir", d, "--name", f"n{i+1}", "--peer", self.nodes[0]["ipc"], "--token", tok,
                                "--api-listen", api, "--ipc-listen", ipc], check=True, capture_output=True)
            node = {"name": f"n{i+1}", "dir": d, "api": api, "ipc": ipc, "proc": None}
            self.nodes.append(node); self.start(node)

    def start(self, node):
        log = open(node["dir"] + ".log", "a")
        node["proc"] = subprocess.Popen([PC, "run", "--data-dir", node["dir"]], stdout=log, stderr=log)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(tuple(node["api"].rsplit(":", 1)[0:1] + [int(node["api"].rsplit(":", 1)[1])]), 0.2).close(); return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{node['name']} did not start")

    def status(self, node):
        r = cli(node["api"], "status", "--json")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def seen(self, viewer, name):
        s = self.status(viewer)
        return next((n["status"] for n in s["nodes"] if n["name"] == name), None) if s else None

    def stop(self):
        for n in self.nodes:
            if n["proc"] and n["proc"].poll() is None:
                n["proc"].kill(); n["proc"].wait()

def wait(pred, secs):
    end = time.time() + secs
    while time.time() < end:
        if pred(): return True
        time.sleep(0.02)
    return False

def detect(kills):
    c = Cluster(3)
    try:
        times = []
        for k in range(kills):
            assert wait(lambda: all(c.seen(c.nodes[0], n["name"]) == "ONLINE" for n in c.nodes), 30), "cluster not ONLINE"
            victim = c.nodes[2]
            time.sleep(1.0)
            victim["proc"].send_signal(signal.SIGKILL); victim["proc"].wait(); t0 = time.time()
            assert wait(lambda: c.seen(c.nodes[0], victim["name"]) == "OFFLINE", 30), "never OFFLINE"
            times.append((time.time() - t0) * 1000)
            c.start(victim)
        times.sort()
        print(json.dumps({"figure": "detection_ms_default_settings", "kills": kills, "median": times[len(times)//2],
                          "min": times[0], "max": times[-1], "all": [round(t) for t in times]}))
    finally:
        c.stop()

def soak(minutes):
    c = Cluster(3)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        assert wait(lambda: all(c.seen(v, n["name"]) == "ONLINE" for v in c.nodes for n in c.nodes), 30), "cluster not ONLINE"
        end = time.time() + minutes * 60; polls = 0; bad = []
        while time.time() < end:
            for v in c.nodes:
                s = c.status(v)
                if not s: continue
                for n in s["nodes"]:
                    if n["status"] in ("OFFLINE",):
                        bad.append((round(time.time()), v["name"], n["name"], n["status"]))
                polls += 1
            time.sleep(1)
        flaps = {}
        for v in c.nodes:
            s = c.status(v)
            for n in (s or {}).get("nodes", []):
                flaps[f"{v['name']}->{n['name']}"] = n.get("flaps", 0)
        print(json.dumps({"figure": "false_offline_marks_busy_cores", "minutes": minutes, "status_polls": polls,
                          "offline_observations": len(bad), "first": bad[:5], "flaps": flaps}))
    finally:
        for h in hogs: h.kill()
        c.stop()

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "detect"
    if what == "detect":
        detect(int(sys.argv[3]) if len(sys.argv) > 3 else 10)
    else:
        soak(float(sys.argv[3]) if len(sys.argv) > 3 else 10)
