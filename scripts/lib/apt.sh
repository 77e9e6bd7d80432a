# Sourced by the scripts in scripts/: the Debian packages among "$@" that are not installed,
# one per line (so that apt-get update runs only when something is missing).
missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || echo "$pkg"
    done
}
