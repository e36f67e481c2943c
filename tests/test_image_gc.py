"""The parent's periodic image garbage collection, on a real store."""

import imagetools
from pufflet import config
from pufflet.priv.imagestore import Store
from pufflet.priv.supervisor import Supervisor
from pufflet.privsep import spec


def supervisor(tmp_path, gc: str) -> Supervisor:
    cfg = config.parse(f'node name n\nuser "nobody"\nstate directory "{tmp_path}"\n{gc}\n')
    sup = Supervisor(cfg, spec.load(), agent_main=None)
    sup._store = Store(str(tmp_path / "images"))
    sup._store.gc_min_age = 0      # images made by the test are brand new
    return sup


def add(store, name, data):
    return imagetools.add_image(store, name, [imagetools.layer(("file", "f", data))])


def test_collects_unused_images_above_threshold(tmp_path):
    sup = supervisor(tmp_path, "image gc high 0 low 0")
    a = add(sup._store, "example.org/a:1", "a")
    b = add(sup._store, "example.org/b:1", "b")
    sup.images_in_use = lambda: {b.digest}
    assert sup.collect_images() == [a.digest]
    assert [i.digest for i in sup._store.list()] == [b.digest]


def test_below_threshold_nothing_goes(tmp_path):
    sup = supervisor(tmp_path, "image gc high 100 low 100")
    add(sup._store, "example.org/a:1", "a")
    assert sup.collect_images() == []
    assert len(sup._store.list()) == 1
