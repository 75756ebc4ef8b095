"""A stand-in Kaggle API on loopback for the real kaggle CLI (2.x with KAGGLE_API_ENVIRONMENT=LOCALHOST
talks to http://localhost/api/v1/<service>/<method>, JSON POSTs). It records every request and plays
Kaggle's rules that matter to the kit: tokens, the cap on concurrent GPU sessions, statuses over time,
kernel outputs and their log, code submissions and their scoring."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KaggleStandIn:
    def __init__(self, gpu_cap=2, polls_until_complete=2, failing=(), token="good-token", user="alice",
                 scoring="scored"):
        self.gpu_cap, self.polls, self.failing, self.token, self.user = gpu_cap, polls_until_complete, failing, \
            token, user
        self.scoring = scoring  # a code submission: scored, failed (scoring error) or refused
        self.requests, self.running, self.remaining, self.max_running, self.pushed = [], set(), {}, 0, []
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                status, answer = standin.answer(self.path.rsplit("/", 1)[-1], body,
                                                self.headers.get("Authorization", ""))
                self._send(status, json.dumps(answer).encode(), "application/json")

            def do_GET(self):  # output files
                self._send(200, f"content of {self.path.rsplit('/', 1)[-1]}\n".encode(), "text/plain")

            def _send(self, status, data, kind):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 80), Handler)  # PermissionError/OSError: caller skips
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method, body, auth):
        with self.lock:
            self.requests.append((method, body))
            if method == "IntrospectToken":
                good = body.get("token") == self.token
                return 200, {"active": good, "username": self.user if good else ""}
            basic = "Basic " + base64.b64encode(f"{self.user}:legacy-key".encode()).decode()
            if auth not in (f"Bearer {self.token}", basic):
                return 401, {"code": 401, "message": "Unauthenticated"}
            if method == "SaveKernel":
                slug = body["slug"]
                gpu = body.get("enableGpu", False) or "advtrain-" in slug
                if gpu and len(self.running) >= self.gpu_cap:
                    return 200, {"ref": "", "url": "", "versionNumber": 0,
                                 "error": f"Maximum batch GPU session count of {self.gpu_cap} reached."}
                self.pushed.append(slug)
                if gpu:
                    self.running.add(slug)
                    self.max_running = max(self.max_running, len(self.running))
                self.remaining[slug] = self.polls
                return 200, {"ref": f"/code/{slug}", "url": f"http://localhost/code/{slug}", "versionNumber": 1,
                             "error": ""}
            if method == "GetKernelSessionStatus":
                slug = f"{body['userName']}/{body['kernelSlug']}"
                if slug not in self.remaining:
                    return 404, {"code": 404, "message": "Not found"}
                self.remaining[slug] -= 1
                if self.remaining[slug] > 0:
                    return 200, {"status": "RUNNING"}
                self.running.discard(slug)
                if slug in self.failing:
                    return 200, {"status": "ERROR", "failureMessage": "Notebook Exceeded Allowed Compute"}
                return 200, {"status": "COMPLETE"}
            if method == "CreateCodeSubmission":
                if self.scoring == "refused":
                    return 400, {"code": 400, "message": "Submission not allowed: this notebook has internet access "
                                                        "enabled"}
                return 200, {"message": "Successfully submitted to the competition", "ref": 4242}
            if method == "GetSubmission":
                if self.scoring == "failed":
                    return 200, {"ref": 4242, "status": "ERROR",
                                 "errorDescription": "Notebook Threw Exception: submission.csv not found"}
                return 200, {"ref": 4242, "status": "COMPLETE", "publicScore": "0.81234"}
            if method == "GetSubmissionLimits":
                return 200, {"numAllowedNow": 4}
            if method == "ListKernelSessionOutput":
                names = ["submission.csv", "metrics.json", "train.log", "model.pt"]
                return 200, {"files": [{"fileName": n, "url": f"http://localhost/files/{n}"} for n in names],
                             "log": json.dumps([{"data": "Traceback ...\n"}, {"data": "RuntimeError: CUDA out of "
                                                                                      "memory\n"}])}
            return 200, {}
