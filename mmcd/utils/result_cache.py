"""Results of long experiments as cached cells, resumable across runs.

A :class:`ResultCache` is a folder of one JSON file per finished cell (a
training, an evaluation) and a ``manifest.json`` recording the code version
(the git commit, plus a digest of uncommitted changes to the package, tools
and configs) and the settings the results depend on. Opening a folder
written by another code version or with other settings is refused, naming
what differs, so a resumed run never mixes results of two versions.
"""
import hashlib
import json
import os
import os.path as osp
import subprocess
from typing import Any, Callable, Dict, Optional

CODE_PATHS = ('mmcd', 'tools', 'configs')


def code_version(repo: str) -> str:
    """``<commit>`` of the checkout at ``repo``, with ``+dirty.<digest>``
    when the package, tools or configs differ from it (the digest of the
    diff and of untracked files' contents); ``'unknown'`` outside git."""
    def git(*args):
        return subprocess.run(['git', '-C', repo, *args], check=True,
                              capture_output=True).stdout
    try:
        commit = git('rev-parse', 'HEAD').decode().strip()
        diff = git('diff', 'HEAD', '--', *CODE_PATHS)
        untracked = git('ls-files', '--others', '--exclude-standard', '--',
                        *CODE_PATHS).decode().split()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'
    if not diff and not untracked:
        return commit
    digest = hashlib.sha256(diff)
    for path in sorted(untracked):
        digest.update(path.encode())
        with open(osp.join(repo, path), 'rb') as f:
            digest.update(f.read())
    return f'{commit}+dirty.{digest.hexdigest()[:12]}'


class ResultCache:
    """Cells of one experiment in ``folder`` (module docstring).

    Args:
        folder: where the cells live (created).
        version: the code version (:func:`code_version`).
        settings: JSON-serializable settings the results depend on.
    """

    def __init__(self, folder: str, version: str, settings: Dict[str, Any]):
        self.folder = folder
        os.makedirs(osp.join(folder, 'cells'), exist_ok=True)
        manifest = osp.join(folder, 'manifest.json')
        settings = json.loads(json.dumps(settings))  # as stored
        if osp.isfile(manifest):
            with open(manifest) as f:
                stored = json.load(f)
            problems = []
            if stored['version'] != version:
                problems.append(f'code version {stored["version"]} (now '
                                f'{version})')
            changed = sorted(k for k in set(stored['settings']) | set(
                settings) if stored['settings'].get(k) != settings.get(k))
            if changed:
                problems.append('settings ' + ', '.join(
                    f'{k}={stored["settings"].get(k)!r} (now '
                    f'{settings.get(k)!r})' for k in changed))
            if problems:
                raise ValueError(
                    f'{folder} holds results of {"; ".join(problems)}: '
                    'resume with the same code and settings, or use another '
                    'work dir (or delete this one) to start over')
        else:
            with open(manifest, 'w') as f:
                json.dump(dict(version=version, settings=settings), f,
                          indent=2)

    def _path(self, key: str) -> str:
        safe = ''.join(c if c.isalnum() or c in '-_.@' else '_' for c in key)
        return osp.join(self.folder, 'cells', f'{safe}.json')

    def get(self, key: str) -> Optional[Any]:
        path = self._path(key)
        if not osp.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)['value']

    def put(self, key: str, value: Any) -> Any:
        """Store ``value`` (written to a temporary file, then renamed: an
        interrupted write leaves no half cell)."""
        path = self._path(key)
        with open(path + '.tmp', 'w') as f:
            json.dump(dict(key=key, value=value), f, indent=2)
        os.replace(path + '.tmp', path)
        return value

    def cell(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cached value of ``key``, or ``compute()`` stored under it."""
        value = self.get(key)
        return value if value is not None else self.put(key, compute())
