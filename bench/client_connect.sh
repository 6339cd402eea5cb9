#!/bin/sh
# BASELINE ONLY: the classic per-client OpenVPN hook that bench/connect_storm_e2e.py (and
# bench/connect_storm.py --baseline shell) compare the vpnfleet agent with. vpnfleet never runs
# it. It is the design of the project's seed: OpenVPN forks a script for every client, and the
# script puts the client's tunnel address into one ipset per group of the user; iptables rules
# made once, by hand, match those sets.
#
# Server configuration (addresses come from OpenVPN's own ifconfig-pool, so no ifconfig-push):
#
#   script-security 2
#   client-connect    "/path/client_connect.sh /etc/openvpn/users hk"
#   client-disconnect "/path/client_connect.sh /etc/openvpn/users hk"
#
# $1: the users file, one line per user who may connect: `NAME GROUP...` (whitespace
#     separated; a disabled user is simply not listed). $2: the set prefix: group G is the
#     ipset `$2-G`, a hash:ip set that must exist. OpenVPN appends a file argument on
#     connect (for dynamic config); nothing needs writing to it here.
# OpenVPN's environment: script_type, common_name, ifconfig_pool_remote_ip.
# Exit 0 lets the client in; any other status makes OpenVPN refuse it (unknown or disabled
# user, bad input, or ipset failing: fail closed, and the adds that went through are taken
# back). Forks: one awk, one ipset.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
users=$1
prefix=$2
cn=$common_name
ip=$ifconfig_pool_remote_ip

case $script_type in
client-connect) op=add ;;
client-disconnect) op=del ;;
*) echo "client_connect.sh: unexpected script_type '$script_type'" >&2; exit 1 ;;
esac
case $cn in
'' | *[!A-Za-z0-9._@-]*) echo "client_connect.sh: refusing common name '$cn'" >&2; exit 1 ;;
esac
case $ip in
'' | *[!0-9.]*) echo "client_connect.sh: no tunnel address for $cn" >&2; exit 1 ;;
esac
case $prefix in
'' | *[!A-Za-z0-9_-]*) echo "client_connect.sh: bad set prefix '$prefix'" >&2; exit 1 ;;
esac

# The user's line, exact match on the first field; awk exits 1 if there is none.
groups=$(awk -v u="$cn" '$1 == u { $1 = ""; print; found = 1; exit } END { exit !found }' "$users") || {
	echo "client_connect.sh: $cn is not allowed (unknown or disabled)" >&2
	exit 1
}

cmds=
for g in $groups; do
	cmds="$cmds$op $prefix-$g $ip
"
done
[ -n "$cmds" ] || exit 0
# One ipset process for all of the user's groups; -exist: re-adding or deleting twice is fine.
ipset -exist restore <<EOF && exit 0
${cmds}COMMIT
EOF
echo "client_connect.sh: ipset failed for $cn ($ip)" >&2
[ "$op" = add ] || exit 1
# Refused: take back whatever part of the adds went through (ipset restore stops at the
# first error and does not roll back).
for g in $groups; do
	ipset -exist del "$prefix-$g" "$ip" 2>/dev/null
done
exit 1
