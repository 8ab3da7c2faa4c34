"""Two emulated hosts on one Linux machine: network namespaces joined by a rate-limited veth pair.

Each namespace gets one end of a veth pair with an address of a private subnet made up here
(10.77.0.1/24 and 10.77.0.2/24 by default), its own loopback, and a token-bucket filter
(``tc qdisc ... tbf rate 1gbit``) on its egress, so traffic between the two is limited like a
1 Gb/s or 10 Gb/s Ethernet link, in each direction. Nothing else is routed: the namespaces see
only each other. A torchrun agent started with ``ip netns exec NS`` (``NetnsPair.prefix(i)``)
lives in namespace i with its ranks; ``master_addr`` is node 0's address.

Needs root and ``ip`` / ``tc`` (iproute2).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (iproute2)"
    return None


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")


@dataclass
class NetnsPair:
    """``tag`` keeps names unique and short (interface names are at most 15 characters)."""

    tag: str
    subnet: str = "10.77.0"

    @property
    def namespaces(self) -> tuple[str, str]:
        return f"hetlm-{self.tag}-n0", f"hetlm-{self.tag}-n1"

    #: The veth end's name in either namespace. The same name on both sides lets one
    #: ``GLOO_SOCKET_IFNAME`` serve every rank: gloo otherwise binds to the address its host
    #: name resolves to, often 127.0.0.1, which in a namespace reaches only itself.
    interface: str = "hetlm0"

    @property
    def _temporary_names(self) -> tuple[str, str]:
        return f"hv{self.tag}a"[:15], f"hv{self.tag}b"[:15]

    def env(self) -> dict[str, str]:
        """Environment for the ranks: gloo's (and NCCL's) sockets on the veth pair."""
        return {"GLOO_SOCKET_IFNAME": self.interface, "NCCL_SOCKET_IFNAME": self.interface}

    @property
    def addresses(self) -> tuple[str, str]:
        return f"{self.subnet}.1", f"{self.subnet}.2"

    def create(self) -> NetnsPair:
        ns, tmp, dev = self.namespaces, self._temporary_names, self.interface
        for name in ns:
            _run("ip", "netns", "add", name)
        _run("ip", "link", "add", tmp[0], "type", "veth", "peer", "name", tmp[1])
        for i in (0, 1):
            _run("ip", "link", "set", tmp[i], "netns", ns[i])
            _run("ip", "-n", ns[i], "link", "set", "dev", tmp[i], "name", dev)
            _run("ip", "-n", ns[i], "addr", "add", f"{self.addresses[i]}/24", "dev", dev)
            _run("ip", "-n", ns[i], "link", "set", "lo", "up")
            _run("ip", "-n", ns[i], "link", "set", dev, "up")
        return self

    def set_rate(self, gbit: float | None) -> None:
        """Limit each direction to ``gbit`` Gbit/s (token bucket); None removes the limit.

        The bucket holds 4 ms of traffic (and at least 1 MB): enough for a timer tick and for
        the 64 KB segments that the kernel's segmentation offload hands to the qdisc.
        """
        dev = self.interface
        for ns in self.namespaces:
            with contextlib.suppress(RuntimeError):
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")
            if gbit is None:
                continue
            rate_bytes = gbit * 1e9 / 8
            burst = max(int(rate_bytes * 0.004), 1 << 20)
            _run(
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{int(gbit * 1000)}mbit",
                "burst",
                str(burst),
                "latency",
                "100ms",
            )

    def prefix(self, index: int) -> list[str]:
        """A command prefix that runs the rest of the command in namespace ``index``, with
        gloo's (and NCCL's) sockets on the veth pair."""
        return [
            "ip",
            "netns",
            "exec",
            self.namespaces[index],
            "env",
            *(f"{k}={v}" for k, v in self.env().items()),
        ]

    def destroy(self) -> None:
        """Delete both namespaces (which deletes the veth pair with them)."""
        for name in self.namespaces:
            with contextlib.suppress(RuntimeError):
                _run("ip", "netns", "del", name)
