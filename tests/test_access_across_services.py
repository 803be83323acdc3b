"""Keys across the running platform: issued by marketing (or the CLI), learnt by every service
from marketing.eventos, verified locally; a revocation lands everywhere within 5 s, and keys keep
working while marketing is down. `alpes up` with ALPES_AUTH=required, the embedded broker."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from harness import Platform, wait_until

# One route per service that needs a key (operator may read it).
READS = {"afiliados": "/afiliados", "conversiones": "/conversiones", "marketing": "/campanas",
         "auditoria": "/auditoria/eventos"}


def _status(platform: Platform, service: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(platform.url(service) + READS[service], headers=headers, timeout=10).status_code


def _cli_key(platform: Platform, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "alpes", "keys", "create", *args, "--data-dir", str(platform.data_dir)],
                          env=platform.env, capture_output=True, text=True, timeout=60, check=True)
    assert "shown once" in done.stderr
    return done.stdout.strip()


def test_keys_reach_every_service_revocations_land_within_5s_and_survive_marketing_down(tmp_path):
    platform = Platform(tmp_path / "alpes", env={"ALPES_AUTH": "required"}).start()
    try:
        # Closed by configuration: no anonymous operator, every non-public route 401 with a challenge.
        for service in READS:
            response = httpx.get(platform.url(service) + READS[service], timeout=10)
            assert response.status_code == 401, (service, response.text)
            assert response.headers["www-authenticate"].startswith('Bearer realm="alpes"')
            health = httpx.get(platform.url(service) + "/health", timeout=10).json()
            assert health["access"]["mode"] == "required" and health["access"]["anonymous_is_operator"] is False

        first = _cli_key(platform, "--role", "operator", "--name", "bootstrap")
        started = time.perf_counter()
        for service in READS:
            wait_until(lambda: _status(platform, service, first) == 200, 30, what=f"{service} to learn the CLI key")
        learnt = time.perf_counter() - started

        created = httpx.post(platform.url("marketing") + "/claves", json={"rol": "operator", "nombre": "second"},
                             headers={"Authorization": f"Bearer {first}"}, timeout=10)
        assert created.status_code == 201, created.text
        second, second_id = created.json()["key"], created.json()["key_id"]
        assert "digest" not in created.json()
        for service in READS:
            wait_until(lambda: _status(platform, service, second) == 200, 30, what=f"{service} to learn the key")
        # Nothing stores or lists the key itself.
        listed = httpx.get(platform.url("marketing") + "/claves", headers={"Authorization": f"Bearer {first}"}).json()
        assert second_id in {k["key_id"] for k in listed["claves"]} and second not in str(listed)

        revoked_at = time.perf_counter()
        assert httpx.delete(platform.url("marketing") + f"/claves/{second_id}",
                            headers={"Authorization": f"Bearer {first}"}).status_code == 200
        refused_after: dict[str, float] = {}
        while len(refused_after) < len(READS) and time.perf_counter() - revoked_at < 10:
            for service in set(READS) - set(refused_after):
                if _status(platform, service, second) == 401:
                    refused_after[service] = time.perf_counter() - revoked_at
            time.sleep(0.05)
        print(f"\nkeys: learnt by all 4 services {learnt:.2f} s after the CLI wrote it; revocation refused "
              + ", ".join(f"{s} {t:.2f} s" for s, t in sorted(refused_after.items())))
        assert set(refused_after) == set(READS) and max(refused_after.values()) <= 5.0, refused_after

        # Keys never reach a log; the start-up table said the platform is closed.
        log = platform.log() + "".join(f.read_text(errors="replace") for f in (platform.data_dir / "logs").glob("*"))
        assert first not in log and second not in log and "API key required" in platform.log()
        # Marketing (the issuer) down: every other service still verifies locally.
        platform.hold("marketing", 20)
        wait_until(lambda: _marketing_down(platform), 30, what="marketing held down")
        for service in ("afiliados", "conversiones", "auditoria"):
            assert _status(platform, service, first) == 200, service
            assert _status(platform, service, second) == 401, service
            assert _status(platform, service, "alpes_op_unknown1_secret") == 401, service
    finally:
        platform.close()


def _marketing_down(platform: Platform) -> bool:
    try:
        httpx.get(platform.url("marketing") + "/health", timeout=1)
    except httpx.HTTPError:
        return True
    return False
