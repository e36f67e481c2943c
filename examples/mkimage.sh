#!/bin/sh
#
# mkimage.sh: build a minimal image from this host's base files.
#
# usage: mkimage.sh [-f pufflet.conf] [-t name] [program ...]
#
# Run as root on an OpenBSD pufflet node.  Puts a shell and a few tools
# from the base system into the image store with puffletctl(8):
#
#	/bin/ksh /bin/sh /bin/echo /bin/sleep /bin/cat /bin/ls /bin/date
#	/bin/mkdir /bin/rm /bin/cp /bin/mv /bin/ln /bin/pwd /bin/kill
#	/bin/test /bin/[ /bin/chmod /bin/expr /bin/hostname
#
# (/bin and /sbin are statically linked on OpenBSD, so these need no
# libraries.)
# The default name is local/base:latest, the image examples/static/hello.yaml
# runs.  On Linux (pufflet's test twin) the same script takes the host's
# /bin/sh and a few tools with the libraries ldd(1) lists.  Programs
# given as arguments go in too; those that are dynamically linked
# (everything outside /bin and /sbin) come with the libraries ldd(1)
# lists and the run-time linker /usr/libexec/ld.so.  For the web
# examples (deployment.yaml, webpod.yaml):
#
#	# sh mkimage.sh -t local/openbsd-web:$(uname -r) /usr/bin/nc
#
# Then, in a pod: image: local/base:latest with
# imagePullPolicy: Never (or IfNotPresent).  The image is this node's
# only: build it on every node, or push it to a registry with
# "puffletctl image push".  It matches the host's release and
# architecture; rebuild it after an upgrade.

set -eu

conf=/etc/pufflet.conf
name=

usage() {
	echo "usage: ${0##*/} [-f pufflet.conf] [-t name] [program ...]" >&2
	exit 1
}

while getopts f:t: opt; do
	case $opt in
	f)	conf=$OPTARG ;;
	t)	name=$OPTARG ;;
	*)	usage ;;
	esac
done
shift $((OPTIND - 1))

[ -n "$name" ] || name=local/base:latest
ctl=${PUFFLETCTL:-puffletctl}

# The libraries a dynamically linked program needs, from ldd(1).  On
# OpenBSD it prints a table (Start End Type Open Ref GrpRef Name): rlib
# rows are shared libraries, the ld.so row the linker.  glibc's ldd
# prints "name => /path (addr)" and "/path (addr)" for the linker.
libs() {
	ldd "$1" 2>/dev/null | awk '
	    $3 == "rlib" || $3 == "ld.so" { print $NF; next }
	    $2 == "=>" && $3 ~ /^\// { print $3; next }
	    $1 ~ /^\// { print $1 }'
}

case $(uname -s) in
OpenBSD)
	# Static on OpenBSD: no libraries needed.
	files="/bin/ksh /bin/sh /bin/echo /bin/sleep /bin/cat /bin/ls /bin/date
/bin/mkdir /bin/rm /bin/cp /bin/mv /bin/ln /bin/pwd /bin/kill /bin/test
/bin/[ /bin/chmod /bin/expr /bin/hostname"
	shell=/bin/ksh ;;
*)
	set -- /bin/sh /bin/echo /bin/sleep /bin/cat /bin/ls /bin/date \
	    /bin/hostname "$@"
	files=
	shell=/bin/sh ;;
esac

for prog; do
	[ -f "$prog" ] || { echo "${0##*/}: $prog: no such file" >&2; exit 1; }
	files="$files $prog $(libs "$prog")"
done

# One --file per path; puffletctl keeps each at its own path in the
# image, with the directories on the way.
set --
for f in $files; do
	set -- "$@" --file "$f"
done

# /etc/hosts and /etc/resolv.conf are written into each pod by pufflet.
exec $ctl -f "$conf" image build -t "$name" \
	--cmd $shell --env PATH=/bin:/usr/bin --workdir / "$@"
