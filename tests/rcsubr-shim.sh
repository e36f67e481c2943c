# A stand-in for OpenBSD's /etc/rc.d/rc.subr, for tests/test_rcd.py.
#
# It provides the few functions and variables rc.d/pufflet uses, with
# the semantics of rc.subr(8) (revision 1.160 and later): rc_exec,
# rc_start, rc_check, rc_reload, rc_stop and rc_cmd with check,
# configtest, start, stop, reload and restart.  Differences, all for
# running on Linux with a POSIX sh:
#   - no rc.conf parsing, no runfile, no login class, no rtable
#     (pgrep -T does not exist on Linux);
#   - rc_exec runs the command with sh -c as the current user (root)
#     instead of su(1) -l -c daemon;
#   - procps' pgrep has no -q: its output goes to /dev/null instead;
#   - restart runs "sh $0" rather than "$0": the script's #!/bin/ksh
#     need not exist here;
#   - the start timeout is polled every 0.1 s rather than with SIGALRM.
# Set by the test in the environment: RC_SHIM_TIMEOUT (daemon_timeout).

_name=${0##*/}
daemon_timeout=${RC_SHIM_TIMEOUT:-30}
daemon_user=root
rc_reload_signal=HUP
rc_stop_signal=TERM

[ -n "${daemon}" ] || { echo "$0: daemon is not set" >&2; exit 1; }

pexp="${daemon}${daemon_flags:+ ${daemon_flags}}"

rc_exec() {
	sh -c "$*"
}

rc_start() {
	rc_exec "${daemon} ${daemon_flags}"
}

rc_check() {
	pgrep -xf "${pexp}" >/dev/null
}

rc_reload() {
	pkill -${rc_reload_signal} -xf "${pexp}"
}

rc_stop() {
	pkill -${rc_stop_signal} -xf "${pexp}"
}

_rc_exit() {
	echo "${_name}($1)"
	[ "$1" = ok ] || [ "$1" = killed ] && exit 0
	exit 1
}

_rc_has() {
	# "typeset -f f" in rc.subr; POSIX sh: is it a function?
	[ "$(command -V "$1" 2>/dev/null | sed -n 's/.* is a .*function.*/yes/p')" = yes ]
}

# Poll cond every 0.1 s for at most daemon_timeout seconds.
_rc_poll() {
	_i=0
	while [ $_i -lt $((daemon_timeout * 10)) ]; do
		eval "$1" && return 0
		sleep 0.1
		_i=$((_i + 1))
	done
	eval "$1"
}

rc_cmd() {
	case "$1" in
	check)
		rc_check && _rc_exit ok
		_rc_exit failed
		;;
	configtest)
		_rc_has rc_configtest || { echo "$0: configtest is not supported" >&2; exit 1; }
		rc_configtest >/dev/null 2>&1 && _rc_exit ok
		_rc_exit failed
		;;
	start)
		# Already running: nothing to do, and success.
		rc_check && exit 0
		if _rc_has rc_configtest; then
			rc_configtest >/dev/null 2>&1 || _rc_exit failed
		fi
		if _rc_has rc_pre; then
			rc_pre >/dev/null 2>&1 || _rc_exit failed
		fi
		# rc_start returns once the daemon has detached.
		rc_start >/dev/null 2>&1 || _rc_exit failed
		_rc_poll rc_check || _rc_exit failed
		_rc_exit ok
		;;
	stop)
		rc_check || exit 0
		rc_stop >/dev/null 2>&1
		_rc_exit_as=ok
		if ! _rc_poll '! rc_check'; then
			pkill -KILL -xf "${pexp}"
			_rc_exit_as=killed
		fi
		if _rc_has rc_post; then
			rc_post >/dev/null 2>&1 || _rc_exit_as=failed
		fi
		_rc_exit ${_rc_exit_as}
		;;
	reload)
		rc_check || _rc_exit failed
		if _rc_has rc_configtest; then
			rc_configtest >/dev/null 2>&1 || _rc_exit failed
		fi
		rc_reload >/dev/null 2>&1 || _rc_exit failed
		_rc_exit ok
		;;
	restart)
		if _rc_has rc_configtest; then
			rc_configtest >/dev/null 2>&1 || _rc_exit failed
		fi
		sh "$0" stop && sh "$0" start
		;;
	*)
		echo "usage: $0 start|stop|restart|reload|check|configtest" >&2
		exit 1
		;;
	esac
}
