"""$(VAR) expansion and argv, against the kubelet's and containerd's rules."""

import pytest

from pufflet.agent.expand import NoCommandError, command_args, env_map, expand
from pufflet.images.oci import ImageConfig

CTX = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}

# The cases of the kubelet's expansion tests (third_party/forked/golang/expansion).
@pytest.mark.parametrize("given,want", [
    ("$(VAR_A)", "A"),
    ("$(VAR_A)-$(VAR_A)", "A-A"),
    ("$(VAR_A)-1", "A-1"),
    ("___$(VAR_B)___", "___B___"),
    ("___$(VAR_C)", "___C"),
    ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"),
    ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
    ("$$(VAR_A)_$$(VAR_B)", "$(VAR_A)_$(VAR_B)"),
    ("f000-$$VAR_A", "f000-$VAR_A"),
    ("foo\\$(VAR_C)bar", "foo\\Cbar"),
    ("foo\\\\$(VAR_C)bar", "foo\\\\Cbar"),
    ("$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"),
    ("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"),
    ("$(VAR_REF)", "$(VAR_A)"),                      # values are not re-expanded
    ("%%$(VAR_REF)--$(VAR_REF)%%", "%%$(VAR_A)--$(VAR_A)%%"),
    ("foo$(VAR_EMPTY)bar", "foobar"),
    ("foo$(VAR_Awhoops!", "foo$(VAR_Awhoops!"),
    ("f00__(VAR_A)__", "f00__(VAR_A)__"),
    ("$?_boo_$!", "$?_boo_$!"),
    ("$VAR_A", "$VAR_A"),
    ("$(VAR_DNE)", "$(VAR_DNE)"),
    ("$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"),
    ("$$$$$$(VAR_A)", "$$$(VAR_A)"),
    ("$$$$$$$(GOOD_ODDS)", "$$$$(GOOD_ODDS)"),
    ("$$$$$$$(VAR_A)", "$$$A"),
    ("$VAR_A)", "$VAR_A)"),
    ("${VAR_A}", "${VAR_A}"),
    ("$(VAR_B)_______$(A", "B_______$(A"),
    ("$(VAR_C)_______$(", "C_______$("),
    ("$(VAR_A)foobarzab$", "Afoobarzab$"),
    ("foo-\\$(VAR_A", "foo-\\$(VAR_A"),
    ("--$($($($($--", "--$($($($($--"),
    ("$($($($($--foo$(", "$($($($($--foo$("),
    ("foo0--$($($($(", "foo0--$($($($("),
    ("$(foo$$var)", "$(foo$$var)"),
    ("\n", "\n"),
    ("", ""),
    ("$", "$"),
    ("$()", "$()"),                                   # empty name: unknown
    ("$(VAR_A)$(VAR_B)", "AB"),
    ("$(VAR_A", "$(VAR_A"),
    ("$($(VAR_A)", "$($(VAR_A)"),                     # name "$(VAR_A": unknown
    ("$é$(VAR_A)", "$éA"),                            # characters stay whole
])
def test_expand(given, want):
    assert expand(given, CTX) == want


def test_expand_reference_chain():
    # As the kubelet expands env in order: each sees the ones before.
    declared: dict[str, str] = {}
    for name, value in [("FOO", "bar"), ("ZOO", "$(FOO)-1"), ("BLU", "$(ZOO)-2")]:
        declared[name] = expand(value, declared)
    assert declared == {"FOO": "bar", "ZOO": "bar-1", "BLU": "bar-1-2"}


def test_env_map_last_wins_and_ignores_bare_names():
    assert env_map(["A=1", "B=x=y", "A=2", "C"]) == {"A": "2", "B": "x=y"}
    assert env_map({"A": "1"}) == {"A": "1"}


IMG = ImageConfig(entrypoint=("/ep", "e1"), cmd=("c1", "c2"), env=(), working_dir="",
                  user="", stop_signal=None, exposed_ports=(), labels=())


@pytest.mark.parametrize("container,image,want", [
    # neither: Entrypoint + Cmd
    ({}, IMG, ["/ep", "e1", "c1", "c2"]),
    # only args: Entrypoint + args
    ({"args": ["a"]}, IMG, ["/ep", "e1", "a"]),
    # command: command (+ args); the image is ignored entirely
    ({"command": ["/bin/x"]}, IMG, ["/bin/x"]),
    ({"command": ["/bin/x"], "args": ["a", "b"]}, IMG, ["/bin/x", "a", "b"]),
    # empty lists are "not set"
    ({"command": [], "args": []}, IMG, ["/ep", "e1", "c1", "c2"]),
    # image as the JSON config object
    ({}, {"Entrypoint": None, "Cmd": ["sh"]}, ["sh"]),
    ({"args": ["x"]}, {"Entrypoint": None, "Cmd": ["sh"]}, ["x"]),
    # Entrypoint [""] is docker's way to say none
    ({}, {"Entrypoint": [""], "Cmd": ["sh", "-c", "x"]}, ["sh", "-c", "x"]),
    ({"args": ["y"]}, {"Entrypoint": [""], "Cmd": ["sh"]}, ["y"]),
    # no image config at all
    ({"command": ["a"]}, None, ["a"]),
])
def test_command_args(container, image, want):
    assert command_args(container, image, {}) == want


def test_command_args_expands_pod_values_only():
    env = ["NAME=world", "DOLLAR=$(NAME)"]
    c = {"command": ["/bin/echo", "$(NAME)", "$$(NAME)", "$(NOPE)"], "args": ["$(DOLLAR)"]}
    assert command_args(c, None, env) == ["/bin/echo", "world", "$(NAME)", "$(NOPE)", "$(NAME)"]
    # The image's own Cmd is never expanded.
    img = {"Entrypoint": ["/ep"], "Cmd": ["$(NAME)"]}
    assert command_args({}, img, env) == ["/ep", "$(NAME)"]


@pytest.mark.parametrize("image", [None, {"Entrypoint": None, "Cmd": None},
                                   {"Entrypoint": [""], "Cmd": []}])
def test_no_command(image):
    with pytest.raises(NoCommandError, match="no command specified"):
        command_args({"name": "c"}, image, {})
