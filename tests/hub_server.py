"""A small Hub-compatible HTTP server on loopback, enough for huggingface_hub's upload and download calls.

Speaks what huggingface_hub 2.4.0 calls (see /work/shared/HUB_NOTES.md): repo creation, YAML validation,
preupload (always ``regular``, so file contents arrive base64 inside the NDJSON commit), commits with a
per-repo history (branches and commit SHAs), model info, tree listing and ``resolve`` with Range.
Blobs live in a directory; only 127.0.0.1 is bound and request threads are daemonic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, str]  # path -> git blob sha1 (also the blob's name in the store)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    discussions: list[dict[str, Any]] = field(default_factory=list)  # pull requests, as the Hub lists them

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit SHA → that commit."""
        sha = self.branches.get(revision, revision if _SHA.fullmatch(revision) else None)
        return self.commits.get(sha) if sha else None


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LoopbackHub:
    """Repository store + HTTP server. ``url`` is the endpoint to put in ``HF_ENDPOINT``."""

    def __init__(self, root: str | Path) -> None:
        self.blob_dir = Path(root) / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) for assertions
        self.auth_headers: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- store ----------------------------------------------------------------------------
    def _put_blob(self, content: bytes) -> str:
        oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()  # git blob id, as the Hub
        path = self.blob_dir / oid
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(content)
            tmp.replace(path)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    def repo(self, repo_type: str, repo_id: str, authorized: bool = True) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> tuple[bool, Repo]:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return False, self.repos[(repo_type, repo_id)]
            repo = Repo(repo_id, repo_type, private)
            self._add_commit(repo, None, "initial commit", {".gitattributes": self._put_blob(b"*.safetensors filter=lfs\n")})
            self.repos[(repo_type, repo_id)] = repo
            return True, repo

    def _add_commit(
        self, repo: Repo, parent: Commit | None, message: str, files: dict[str, str], branch: str | None = None
    ) -> Commit:
        digest = hashlib.sha1(json.dumps([parent.sha if parent else None, message, sorted(files.items()), time.time_ns()]).encode())
        commit = Commit(digest.hexdigest(), parent.sha if parent else None, message, files)
        repo.commits[commit.sha] = commit
        repo.branches[branch or ("main" if parent is None else _branch_of(repo, parent))] = commit.sha
        return commit

    # -- fixture side: lay out a repo as a real one is, without going through the client ---------
    def put_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Upload folder using huggingface_hub",
        pull_request_author: str | None = None,
        title: str | None = None,
    ) -> Commit:
        """Commit ``files`` on ``branch`` (created from main when new); a ``refs/pr/N`` branch gets its PR listed."""
        self.create_repo(repo_type, repo_id, private=False)
        repo = self.repos[(repo_type, repo_id)]
        with self.lock:
            parent = repo.commits[repo.branches.get(branch, repo.branches["main"])]
            merged = {**parent.files, **{path: self._put_blob(content) for path, content in files.items()}}
            commit = self._add_commit(repo, parent, message, merged, branch=branch)
            match = re.fullmatch(r"refs/pr/(\d+)", branch)
            if match and pull_request_author is not None:
                repo.discussions.append({
                    "num": int(match.group(1)), "title": title or message, "status": "open", "isPullRequest": True,
                    "author": {"name": pull_request_author}, "createdAt": "2023-04-12T00:00:00.000Z",
                    "repo": {"name": repo_id, "type": repo_type},
                })  # fmt: skip
            return commit

    def downloads(self, repo_id: str, since: int = 0) -> list[str]:
        """Files fetched from ``repo_id`` through ``resolve`` (GET, not HEAD) after request ``since``, as ``revision/path``."""
        found = []
        for method, path in self.requests[since:]:
            match = _RESOLVE.match(path)
            if method == "GET" and match and unquote(match.group("repo")) == repo_id:
                found.append(f"{unquote(match.group('rev'))}/{unquote(match.group('path'))}")
        return found

    def commit(self, repo: Repo, revision: str, lines: list[dict[str, Any]]) -> Commit:
        revision = unquote(revision)
        with self.lock:
            if revision not in repo.branches:
                raise HubError(404, "RevisionNotFound", f"Branch {revision} not found (commits go to a branch)")
            parent = repo.commits[repo.branches[revision]]
            files = dict(parent.files)
            header = next((line["value"] for line in lines if line.get("key") == "header"), {})
            if header.get("parentCommit") and header["parentCommit"] != parent.sha:
                raise HubError(412, None, "parentCommit is not the head of the branch")
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "header":
                    continue
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, None, f"invalid path in commit: {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, None, "only base64 file content is supported")
                    files[path] = self._put_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
                elif key == "deletedFolder":
                    for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                        del files[name]
                else:
                    raise HubError(400, None, f"unsupported commit operation {key!r} (LFS is not served here)")
            return self._add_commit(repo, parent, header.get("summary", ""), files)


def _branch_of(repo: Repo, parent: Commit) -> str:
    return next(name for name, sha in repo.branches.items() if sha == parent.sha)


# ----------------------------------------------------------------------------- HTTP layer
_API_REPO = re.compile(r"/api/(models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _make_handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        # -- helpers ------------------------------------------------------------------------
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
            body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
            self.send_response(status)
            content_type = "application/octet-stream" if raw is not None else "application/json"
            self.send_header("Content-Type", content_type)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            if auth:
                hub.auth_headers.append(auth)
            return auth.startswith("Bearer ")

        def _dispatch(self) -> None:
            split = urlsplit(self.path)
            path, query = unquote(split.path), parse_qs(split.query)
            hub.requests.append((self.command, split.path))
            try:
                self._route(split.path, path, query)
            except HubError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, {"error": err.message}, headers)

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch()

        do_HEAD = do_GET  # noqa: N815

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch()

        # -- routes ---------------------------------------------------------------------------
        def _route(self, raw_path: str, path: str, query: dict[str, list[str]]) -> None:
            if self.command == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(self._body() or b"{}"))
            if self.command == "POST" and path == "/api/validate-yaml":
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            match = _API_REPO.match(raw_path)
            if match:
                repo_type = match.group(1)[:-1]
                repo = hub.repo(repo_type, unquote(match.group("repo")), self._authorized())
                return self._api(repo, match.group("rest") or "", query)
            match = _RESOLVE.match(raw_path)
            if match and self.command in ("GET", "HEAD"):
                repo_type = (match.group("type") or "models")[:-1]
                repo = hub.repo(repo_type, unquote(match.group("repo")), self._authorized())
                return self._resolve(repo, match.group("rev"), unquote(match.group("path")))
            raise HubError(404, None, f"no route for {self.command} {path}")

        def _create_repo(self, payload: dict[str, Any]) -> None:
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            repo_type = payload.get("type") or "model"
            created, repo = hub.create_repo(repo_type, repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            if created:
                return self._send(200, {"url": url, "name": repo_id, "id": repo_id})
            self._send(409, {"error": "You already created this model repo", "url": url}, {"X-Error-Message": "You already created this model repo"})

        def _api(self, repo: Repo, rest: str, query: dict[str, list[str]]) -> None:
            parts = rest.strip("/").split("/", 1) if rest else [""]
            action, tail = parts[0], parts[1] if len(parts) > 1 else ""
            if self.command == "POST" and action == "preupload":
                hub.commit_of(repo, tail)
                files = json.loads(self._body())["files"]
                answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
                return self._send(200, {"files": answer, "commitOid": repo.branches.get(unquote(tail))})
            if self.command == "POST" and action == "commit":
                lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                commit = hub.commit(repo, tail, lines)
                url = f"{hub.url}/{repo.repo_id}/commit/{commit.sha}"
                return self._send(200, {"success": True, "commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": None})
            if self.command == "GET" and action == "discussions":
                wanted = {key: query[key][0] for key in ("author", "type", "status") if key in query}
                found = [
                    d for d in repo.discussions
                    if wanted.get("author") in (None, d["author"]["name"])
                    and wanted.get("type") in (None, "all", "pull_request" if d["isPullRequest"] else "discussion")
                    and wanted.get("status") in (None, "all", d["status"])
                ]  # fmt: skip
                return self._send(200, {"discussions": found, "count": len(found), "start": 0, "numClosedDiscussions": 0})
            if self.command == "GET" and action in ("", "revision"):
                commit = hub.commit_of(repo, tail or "main")
                return self._send(200, self._info(repo, commit))
            if self.command == "GET" and action == "tree":
                revision, _, folder = tail.partition("/")
                commit = hub.commit_of(repo, revision)
                return self._send(200, self._tree(commit, unquote(folder), query.get("recursive", ["false"])[0] in ("true", "True", "1")))
            raise HubError(404, None, f"unsupported API call {self.command} {rest}")

        def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            return {
                "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha,
                "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "tags": [], "lastModified": now, "createdAt": now,
                "siblings": [{"rfilename": name} for name in sorted(commit.files)],
            }

        def _tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict[str, Any]]:
            prefix = folder.strip("/") + "/" if folder.strip("/") else ""
            entries: dict[str, dict[str, Any]] = {}
            for name, oid in sorted(commit.files.items()):
                if not name.startswith(prefix):
                    continue
                rel_parts = name[len(prefix) :].split("/")
                for depth in range(1, len(rel_parts)):
                    sub = prefix + "/".join(rel_parts[:depth])
                    entries.setdefault(sub, {"type": "directory", "path": sub, "oid": hashlib.sha1(sub.encode()).hexdigest(), "size": 0})
                    if not recursive:
                        break
                if recursive or len(rel_parts) == 1:
                    size = (hub.blob_dir / oid).stat().st_size
                    entries[name] = {"type": "file", "path": name, "oid": oid, "size": size}
            return list(entries.values())

        def _resolve(self, repo: Repo, revision: str, path: str) -> None:
            commit = hub.commit_of(repo, revision)
            if path not in commit.files:
                raise HubError(404, "EntryNotFound", f"{path} does not exist at {revision}")
            oid = commit.files[path]
            content = hub.blob(oid)
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
            match = _RANGE.match(self.headers.get("Range", "").strip())
            if match and self.command == "GET" and (match.group(1) or match.group(2)):
                start = int(match.group(1)) if match.group(1) else max(0, len(content) - int(match.group(2)))
                end = int(match.group(2)) if match.group(1) and match.group(2) else len(content) - 1
                if start >= len(content):
                    return self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"error": "range"}, {"Content-Range": f"bytes */{len(content)}"})
                end = min(end, len(content) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                return self._send(206, headers=headers, raw=content[start : end + 1])
            self._send(200, headers=headers, raw=content)

    return Handler
