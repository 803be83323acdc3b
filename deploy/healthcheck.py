#!/usr/bin/env python3
"""Container health check of one AlpesPartner service: exit 0 when its GET /health answers 200.

Installed in the image as /usr/local/bin/alpes-healthcheck (deploy/Dockerfile). Standard library
only and no `alpes` import, so a check costs a few milliseconds and never touches the database
or the broker itself (the service's /health does that and answers 503 when either is down).

    alpes-healthcheck http://127.0.0.1:8003/health   # the URL given (what deploy/compose.yaml does)
    alpes-healthcheck                                # the image's HEALTHCHECK: find the service

Without a URL it tries the ports of the four services (ALPES_<SERVICE>_PORT, default 8001-8004)
on 127.0.0.1: a container runs one service, so the one port that accepts a connection is its
port, and that service's answer decides. Nothing listening on any of them: unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

# The contract's ports (src/alpes/contract.py SERVICES); tests/test_deploy.py checks they agree.
DEFAULT_PORTS = {"afiliados": 8001, "conversiones": 8002, "marketing": 8003, "auditoria": 8004}
TIMEOUT_SECONDS = 4.0


def probe(url: str, timeout: float = TIMEOUT_SECONDS) -> tuple[bool | None, str]:
    """(True, why) on 200, (False, why) on any other answer, (None, why) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http only, loopback)
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as error:  # 503: the service is up and says it is degraded
        return False, f"{url}: {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return None, f"{url}: {getattr(error, 'reason', error)}"


def candidate_urls() -> list[str]:
    urls = []
    for name, default in DEFAULT_PORTS.items():
        port = os.environ.get(f"ALPES_{name.upper()}_PORT", str(default))
        urls.append(f"http://127.0.0.1:{port}/health")
    return urls


def main(argv: list[str]) -> int:
    urls = argv[1:2] or candidate_urls()
    reasons = []
    for url in urls:
        healthy, why = probe(url)
        reasons.append(why)
        if healthy is not None:
            print(why)
            return 0 if healthy else 1
    print("unhealthy: nothing answered (" + "; ".join(reasons) + ")", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
