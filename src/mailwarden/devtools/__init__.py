"""Tools for development, tests and the demo, not used by the daemon: a DNS server that serves
zones from YAML on loopback (`devdns`)."""
