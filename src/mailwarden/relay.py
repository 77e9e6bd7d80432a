"""Host groups: IPv4/IPv6 addresses, CIDR ranges and host names (resolved through the shared
resolver, so their addresses are cached for their TTL)."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

from mailwarden.deadline import Deadline
from mailwarden.dns import DNSClient, IPAddress, Status

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                       r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z")


class Membership(enum.Enum):
    IN = "in"
    OUT = "out"
    UNKNOWN = "unknown"  # a host name could not be resolved just now


def check_host_entry(entry: str) -> str | None:
    """Why `entry` is not an address, a CIDR range or a host name (None when it is one)."""
    if "/" in entry or ":" in entry or entry.replace(".", "").isdigit():
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            return f"not an address or CIDR range: {exc}"
        return None
    if not _HOSTNAME.match(entry):
        return f"not an address, CIDR range or host name: {entry!r}"
    return None


@dataclass(frozen=True, slots=True)
class HostGroup:
    name: str
    networks: tuple[IPNetwork, ...]
    hostnames: tuple[str, ...]

    @classmethod
    def from_entries(cls, name: str, entries: tuple[str, ...]) -> HostGroup:
        networks: list[IPNetwork] = []
        hostnames: list[str] = []
        for entry in entries:
            if check_host_entry(entry) is not None:
                raise ValueError(f"bad entry {entry!r} in host group {name!r}")
            if _HOSTNAME.match(entry) and not entry.replace(".", "").isdigit():
                hostnames.append(entry.lower().rstrip("."))
            else:
                networks.append(ipaddress.ip_network(entry, strict=False))
        return cls(name, tuple(networks), tuple(hostnames))

    def membership(self, ip: IPAddress, dns: DNSClient, deadline: Deadline | None = None
                   ) -> Membership:
        """Is `ip` in the group? Host names are looked up (A or AAAA by the address family)."""
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip.version == net.version and ip in net for net in self.networks):
            return Membership.IN
        unknown = False
        for hostname in self.hostnames:
            answer = dns.a(hostname, deadline) if ip.version == 4 else dns.aaaa(hostname, deadline)
            if answer.status is Status.TEMPERROR:
                unknown = True
            elif ip in answer.records:
                return Membership.IN
        return Membership.UNKNOWN if unknown else Membership.OUT
