"""The FlexVolume prober (volplane.volumeplugins.prober) with real files, real drivers
and the real watcher (watchfiles/inotify), driven through VolumePluginRegistry.run."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from watchfiles import Change

from volplane.volumeplugins import FlexVolumeProber, ProbeOp, VolumePluginRegistry, VolumeSpec

from .flex_helpers import SAMPLE, fake_driver, flex_pv, metric

GOOD = """echo '{"status":"Success","capabilities":{"attach":true}}'\n"""
GARBAGE = """echo 'Traceback (most recent call last): oops'\n"""


async def until(cond, timeout=15.0, what="condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Running:
    """A registry with a prober on ``plugin_dir``, its run() loop as a task."""

    def __init__(self, plugin_dir: Path, **kw):
        self.problems = []
        self.changes = []
        self.prober = FlexVolumeProber(str(plugin_dir), debounce_ms=50, retry_interval=0.5,
                                       call_timeout=5, kill_grace=0.2, **kw)
        self.registry = VolumePluginRegistry(prober=self.prober)

    async def __aenter__(self):
        self.task = asyncio.create_task(self.registry.run(
            on_change=self.changes.append, on_problem=self.problems.append))
        await asyncio.wait_for(self.prober.ready.wait(), 15)
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task

    def names(self):
        return set(self.registry.probed)


def install_sample(plugin_dir: Path):
    shutil.copytree(SAMPLE, plugin_dir / SAMPLE.name)


def test_drivers_added_and_removed_at_run_time(tmp_path, monkeypatch):
    monkeypatch.setenv("VOLPLANE_DEMO_DISK_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("VOLPLANE_DEMO_DISK_STATE", str(tmp_path / "state"))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    fake_driver(plugins, GOOD, "acme~early")

    async def scenario():
        async with Running(plugins) as r:
            await until(lambda: r.names() == {"acme/early"}, what="the driver present at start")
            # a driver copied in while running
            install_sample(plugins)
            await until(lambda: "volplane-demo/disk" in r.names(), what="the copied driver")
            spec = VolumeSpec.from_pv(flex_pv())
            plugin = r.registry.find_attachable_plugin_by_spec(spec)
            assert plugin.name == "volplane-demo/disk"
            assert await plugin.attach(spec, "n1")
            # removing the executable drops the driver; its directory may stay
            (plugins / "acme~early" / "early").unlink()
            await until(lambda: "acme/early" not in r.names(), what="the driver whose "
                                                                  "executable was removed")
            # removing a whole driver directory drops it too
            shutil.rmtree(plugins / SAMPLE.name)
            await until(lambda: r.names() == set(), what="the removed driver directory")
            ops = [(e.op, e.plugin_name) for batch in r.changes for e in batch]
            assert (ProbeOp.ADD_OR_UPDATE, "volplane-demo/disk") in ops
            assert (ProbeOp.REMOVE, "volplane-demo/disk") in ops
            assert (ProbeOp.REMOVE, "acme/early") in ops
            assert r.problems == []

    asyncio.run(scenario())
    assert metric("volplane_flexvolume_probes_total", driver="volplane-demo/disk",
                  result="removed") >= 1


def test_garbage_driver_is_reported_once_skipped_and_retried(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    fake_driver(plugins, GOOD, "acme~good")

    async def scenario():
        async with Running(plugins) as r:
            await until(lambda: r.names() == {"acme/good"})
            bad = fake_driver(plugins, GARBAGE, "acme~bad")
            await until(lambda: r.problems, what="a reported problem")
            p = r.problems[0]
            assert (p.dir_name, p.driver, p.command) == ("acme~bad", "acme/bad", "init")
            assert p.message.startswith("error creating Flexvolume plugin from directory "
                                        "acme~bad, skipping. Error: flexVolume driver acme/bad: "
                                        "init command printed an invalid answer: not JSON")
            assert "Traceback" in p.message
            # retried (retry_interval 0.5 s) but reported once; the good driver still works
            await asyncio.sleep(1.6)
            assert len(r.problems) == 1
            assert r.names() == {"acme/good"}
            assert r.prober.problems.keys() == {"acme~bad"}
            # fixed in place: the next probe picks it up and the problem is cleared
            bad.write_text("#!/bin/sh\n" + GOOD)
            await until(lambda: "acme/bad" in r.names(), what="the fixed driver")
            assert r.prober.problems == {}

    asyncio.run(scenario())
    assert metric("volplane_flexvolume_probes_total", driver="acme/bad", result="failed") >= 1


def test_hanging_init_and_bad_names_never_stop_the_prober(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    fake_driver(plugins, "sleep 30\n", "acme~slow")
    fake_driver(plugins, GOOD, "Bad_Vendor~x")  # "Bad_Vendor" is no DNS subdomain
    fake_driver(plugins, GOOD, ".hidden~y")
    (plugins / "README").write_text("not a driver\n")

    async def scenario():
        r = Running(plugins)
        r.prober.call_timeout = 0.3
        async with r:
            await until(lambda: {p.dir_name for p in r.problems} >= {"acme~slow", "Bad_Vendor~x"},
                        what="both problems")
            by_dir = {p.dir_name: p for p in r.problems}
            assert "init command timed out after 0.3s" in by_dir["acme~slow"].message
            assert by_dir["Bad_Vendor~x"].permanent
            bad = by_dir["Bad_Vendor~x"].message
            assert 'volume plugin has invalid name: "Bad_Vendor/x"' in bad
            fake_driver(plugins, GOOD, "acme~late")
            await until(lambda: r.names() == {"acme/late"}, what="a good driver after bad ones")
            assert not r.task.done()
            # hidden directories and plain files are not drivers: never probed or reported
            assert {p.dir_name for p in r.problems} == {"acme~slow", "Bad_Vendor~x"}

    asyncio.run(scenario())


def test_plugin_dir_created_and_recreated(tmp_path):
    plugins = tmp_path / "a" / "plugins"  # does not exist yet

    async def scenario():
        async with Running(plugins) as r:
            assert plugins.is_dir()
            fake_driver(plugins, GOOD, "acme~one")
            await until(lambda: r.names() == {"acme/one"})
            shutil.rmtree(plugins)
            await until(lambda: r.names() == set() and plugins.is_dir(),
                        what="the directory re-created and its driver forgotten")
            fake_driver(plugins, GOOD, "acme~two")
            await until(lambda: r.names() == {"acme/two"}, what="a driver in the new directory")

    asyncio.run(scenario())


def test_uncreatable_plugin_dir_is_reported_not_fatal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")

    async def scenario():
        prober = FlexVolumeProber(str(blocker / "plugins"), retry_interval=0.2)
        problems = []
        reg = VolumePluginRegistry(prober=prober)
        task = asyncio.create_task(reg.run(on_problem=problems.append))
        await until(lambda: problems, what="a reported problem")
        assert "plugins" in problems[0].message and problems[0].dir_name == ""
        assert not task.done()
        assert reg.find_plugin_by_name("kubernetes.io/csi")  # CSI unaffected
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_handle_changes_maps_events_like_upstream(tmp_path):
    """upstream handleWatchEvent: executable or driver dir removed -> remove; any other
    change inside a driver dir -> add-or-update; dot files ignored."""
    prober = FlexVolumeProber(str(tmp_path))
    prober._probe_all_needed = False
    d = str(tmp_path)
    root_gone = prober.handle_changes([
        (Change.deleted, f"{d}/v~a/a"),            # the executable
        (Change.deleted, f"{d}/v~b"),              # the driver dir
        (Change.deleted, f"{d}/v~c/notes.txt"),    # something else in a driver dir
        (Change.added, f"{d}/v~d"),
        (Change.modified, f"{d}/v~e/e"),
        (Change.added, f"{d}/v~f/.swp"),           # dot file
        (Change.added, f"{d}/.tmp~g"),             # dot dir
        (Change.added, f"{tmp_path.parent}/elsewhere"),
    ])
    assert not root_gone
    assert prober._pending == {"v~a": ProbeOp.REMOVE, "v~b": ProbeOp.REMOVE,
                               "v~c": ProbeOp.ADD_OR_UPDATE, "v~d": ProbeOp.ADD_OR_UPDATE,
                               "v~e": ProbeOp.ADD_OR_UPDATE}
    assert prober.changed.is_set()
    assert prober.handle_changes([(Change.deleted, d)])
    assert prober.has_pending()
