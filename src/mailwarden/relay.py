"""Host groups: IPv4/IPv6 addresses, CIDR ranges and host names (resolved through the shared
resolver, so their addresses are cached for their TTL)."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
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


# OpenDKIM's and Postfix's word for the machine itself (a name our resolver would not know)
LOCALHOST = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def check_host_entry(entry: str) -> str | None:
    """Why `entry` is not an address, a CIDR range or a host name, each perhaps preceded by
    `!` (an exclusion), or None when it is one."""
    entry = entry.removeprefix("!")
    if "/" in entry or ":" in entry or entry.replace(".", "").isdigit():
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            return f"not an address or CIDR range: {exc}"
        return None
    if entry.lower() != "localhost" and not _HOSTNAME.match(entry):
        return f"not an address, CIDR range or host name: {entry!r}"
    return None


@dataclass(frozen=True, slots=True)
class Hosts:
    """Addresses, ranges and host names: one side of a host group."""

    networks: tuple[IPNetwork, ...] = ()
    hostnames: tuple[str, ...] = ()

    def match(self, ip: IPAddress, dns: DNSClient, deadline: Deadline | None) -> Membership:
        """IN when `ip` is one of them; host names are looked up (A or AAAA by the family)."""
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


@dataclass(frozen=True, slots=True)
class HostGroup:
    """Clients in `included` and not in `excluded` (`!` entries: an exclusion wins, as in
    OpenDKIM's peer lists)."""

    name: str
    included: Hosts
    excluded: Hosts = Hosts()

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self.included.networks

    @classmethod
    def from_entries(cls, name: str, entries: tuple[str, ...]) -> HostGroup:
        sides: dict[bool, tuple[list[IPNetwork], list[str]]] = {True: ([], []), False: ([], [])}
        for entry in entries:
            if check_host_entry(entry) is not None:
                raise ValueError(f"bad entry {entry!r} in host group {name!r}")
            networks, hostnames = sides[entry.startswith("!")]
            entry = entry.removeprefix("!")
            if entry.lower() == "localhost":
                networks.extend(LOCALHOST)
            elif _HOSTNAME.match(entry) and not entry.replace(".", "").isdigit():
                hostnames.append(entry.lower().rstrip("."))
            else:
                networks.append(ipaddress.ip_network(entry, strict=False))
        included, excluded = ((tuple(n), tuple(h)) for n, h in (sides[False], sides[True]))
        return cls(name, Hosts(*included), Hosts(*excluded))

    def membership(self, ip: IPAddress, dns: DNSClient, deadline: Deadline | None = None
                   ) -> Membership:
        """Is `ip` in the group? UNKNOWN when a host name that decides could not be looked
        up just now."""
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        excluded = self.excluded.match(ip, dns, deadline)
        if excluded is Membership.IN:
            return Membership.OUT
        included = self.included.match(ip, dns, deadline)
        if included is Membership.IN and excluded is Membership.UNKNOWN:
            return Membership.UNKNOWN
        return included


def internal_networks(groups: Iterable[HostGroup]) -> tuple[IPNetwork, ...]:
    """The networks of every host group: our own sources, which reports to other domains
    leave out (addresses excluded with `!` are not subtracted)."""
    return tuple(net for group in groups for net in group.networks)
