"""ECNixlConnector against each vLLM release we serve, read from the release's sources
(integration.compat); and what the check says when a release breaks something we rely
on, shown on a small fake release (tests/fake_vllm.py) changed one thing at a time."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path

import pytest
from fake_vllm import BASE, GPU_WORKER, OUTPUT, UTILS, V2_CONNECTOR, edit, write_release

from integration import compat, stock_proxy, vllm_release
from integration.compat import items
from integration.compat.__main__ import main
from integration.compat.source_tree import SourceTree

# The V1 model runner's files, by release: 0.34 removed them.
V1_RUNNER = {"0.32.0": True, "0.33.0": True, "0.34.0": False}


@pytest.mark.parametrize("version", list(vllm_release.RELEASES))
def test_the_connector_fits_every_pinned_release(version):
    report = compat.check(compat.release_tree(version))
    assert report.passed, report.render()
    table = "\n".join(report.sections[-1].table)
    assert ("V1 model runner: removed" in table) != V1_RUNNER[version]
    assert "v1/worker/gpu/ec_connector.py" in table  # the V2 runner calls the hooks


def test_the_check_names_the_key_0_33_added_for_a_parser_that_lacks_it(monkeypatch):
    from ec_nixl import transfer_params

    monkeypatch.delitem(transfer_params.VLLM_ITEM_KEYS, "modality")
    section = items.check(compat.release_tree("0.33.0"))
    assert [f.text for f in section.findings if not f.ok] == [
        f"{case}: E's answer carries keys PD does not know: modality"
        for case in ("one image", "two images", "the same image twice")
    ]


def failures(tmp_path: Path, changes=None, ours: SourceTree | None = None) -> list[str]:
    """What the check names against the fake release with `changes`, line numbers as N."""
    release = SourceTree.from_directory(write_release(tmp_path, changes), "vllm", "fake vLLM")
    report = compat.check(release, ours)
    return [re.sub(r"\.py:\d+", ".py:N", failure) for failure in report.failures]


def test_the_fake_release_passes(tmp_path):
    assert failures(tmp_path) == []


def test_a_name_we_import_that_the_release_lacks_is_named(tmp_path):
    changes = edit(UTILS, "class PlaceholderMetadataResolver:", "class MetadataResolver:")
    assert failures(tmp_path, changes) == [
        "b. vllm.distributed.ec_transfer.ec_connector.utils does not define "
        "PlaceholderMetadataResolver (imported at ec_nixl/connector.py:N)"
    ]


def test_a_module_we_import_that_the_release_lacks_is_named(tmp_path):
    changes = {"vllm/distributed/ec_transfer/ec_connector/factory.py": None}
    assert failures(tmp_path, changes) == [
        "b. vllm.distributed.ec_transfer.ec_connector.factory: no such module "
        "(imported at ec_nixl/plugin.py:N)",
        "c. vllm.distributed.ec_transfer.ec_connector.factory has no class ECConnectorFactory",
    ]


def test_a_name_only_type_checkers_see_is_not_an_export(tmp_path):
    changes = {
        "vllm/distributed/__init__.py": """
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from .parallel_state import get_tensor_model_parallel_rank
            """
    }
    assert failures(tmp_path, changes) == [
        "b. vllm.distributed does not define get_tensor_model_parallel_rank "
        "(imported at ec_nixl/connector.py:N)"
    ]


def test_a_base_method_whose_parameter_was_renamed_is_named(tmp_path):
    changes = edit(
        BASE,
        "def save_caches(self, encoder_cache, mm_hash, **kwargs):",
        "def save_caches(self, encoder_cache, identifier, **kwargs):",
    )
    (failure,) = failures(tmp_path, changes)
    assert failure.startswith(
        "a. ECNixlConnector.save_caches(encoder_cache, mm_hash, **kwargs) does not fit "
        "ECConnectorBase.save_caches(encoder_cache, identifier, **kwargs)"
    )
    assert failure.endswith("parameter 2 is 'mm_hash' where the base's is 'identifier', "
                            "so a call by name misses it")  # fmt: skip


def test_a_base_method_that_lost_its_kwargs_is_named(tmp_path):
    changes = edit(
        BASE,
        "def start_save_caches(self, **kwargs):",
        "def start_save_caches(self, encoder_cache, metadata=None):",
    )
    (failure,) = failures(tmp_path, changes)
    assert "ECNixlConnector.start_save_caches(**kwargs) does not fit" in failure
    assert "takes no parameter 1 ('encoder_cache' in the base's)" in failure


def test_a_new_abstract_method_is_named(tmp_path):
    abstract = "    @abstractmethod\n    def wait_for_save(self):\n        pass\n\n"
    changes = edit(BASE, "    def shutdown(self):", abstract + "    def shutdown(self):")
    assert failures(tmp_path, changes) == [
        "a. ECNixlConnector(ECConnectorBase): does not implement the abstract wait_for_save "
        "(vllm/distributed/ec_transfer/ec_connector/base.py:N)"
    ]


def test_a_base_attribute_we_use_that_is_gone_is_named(tmp_path):
    getter = "    def _get_connector_metadata(self):\n        return self._connector_metadata\n"
    assert failures(tmp_path, edit(BASE, getter, "")) == [
        "a. ECNixlConnector(ECConnectorBase) uses self._get_connector_metadata, "
        "which ECConnectorBase does not define"
    ]


def test_an_attribute_we_read_that_the_release_dropped_is_named(tmp_path):
    changes = edit(OUTPUT, "    free_encoder_mm_hashes: list", "")
    (failure,) = failures(tmp_path, changes)
    assert failure.startswith(
        "c. SchedulerOutput (vllm/v1/core/sched/output.py:N) has no free_encoder_mm_hashes "
        "(read at ec_nixl/connector.py:N"
    )


def test_an_item_entry_our_parser_refuses_is_named(tmp_path):
    changes = edit(UTILS, 'entry["item_indices"].append(index)', 'entry["item_indices"] = index')
    named = failures(tmp_path, changes)
    assert len(named) == 3  # one per case
    assert named[0].startswith("d. one image: PD refuses E's answer: ec_transfer_params['aaaa")
    assert named[0].endswith("['item_indices'] must be a list of distinct indices, got '0'")


def test_an_item_key_our_parser_does_not_know_is_named(tmp_path):
    changes = edit(UTILS, '{"modality": feature.modality,', '{"modality": feature.modality, '
                   '"transfer_id": "t",')  # fmt: skip
    assert (
        failures(tmp_path, changes)[0]
        == "d. one image: E's answer carries keys PD does not know: transfer_id"
    )


def test_a_metadata_function_that_needs_more_of_vllm_is_named(tmp_path):
    changes = edit(UTILS, "metadata: dict[str, Any] = {}", "metadata = make_metadata()")
    (failure,) = failures(tmp_path, changes)
    assert failure.startswith("d. collect_ec_item_metadata (")
    assert failure.endswith("uses make_metadata, which this check has no stand-in for")


def test_a_hook_called_positionally_where_we_read_a_keyword_is_named(tmp_path):
    changes = edit(
        V2_CONNECTOR,
        "ec_connector.start_save_caches(encoder_cache=self.encoder_cache)",
        "ec_connector.start_save_caches(self.encoder_cache)",
    )
    changes |= edit(
        BASE, "start_save_caches(self, **kwargs)", "start_save_caches(self, *a, **kwargs)"
    )
    assert failures(tmp_path, changes) == [
        "a. ECNixlConnector.start_save_caches(**kwargs) does not fit "
        "ECConnectorBase.start_save_caches(*args, **kwargs) "
        "(vllm/distributed/ec_transfer/ec_connector/base.py:N): "
        "does not take *args, which the base's does",
        "e. v1/worker/gpu/ec_connector.py:N calls start_save_caches(<arg>): passes 1 "
        "positional arguments, ours takes 0; does not pass encoder_cache=, which ours reads "
        "from its kwargs",
    ]


def test_a_hook_nothing_calls_is_named(tmp_path):
    changes = edit(GPU_WORKER, "get_ec_transfer().start_worker_services()", "pass")
    assert failures(tmp_path, changes) == [
        "e. nothing calls start_worker_services: ECNixlConnector.start_worker_services "
        "would never run"
    ]


def test_an_override_we_changed_is_named_against_every_release_shape(tmp_path):
    ours = compat.our_tree()
    source = ours.files[compat.CONNECTOR].replace(
        "def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs)",
        "def start_load_caches(self, cache: dict[str, torch.Tensor], **kwargs)",
    )
    changed = SourceTree({**ours.files, compat.CONNECTOR: source}, "ec_nixl")
    (failure,) = failures(tmp_path, ours=changed)
    assert "parameter 1 is 'cache' where the base's is 'encoder_cache'" in failure


def test_a_stale_entry_of_reads_is_named(tmp_path):
    ours = compat.our_tree()
    source = (
        ours.files[compat.CONNECTOR].replace("parallel.", "par.").replace("parallel =", "par =")
    )
    changed = SourceTree({**ours.files, compat.CONNECTOR: source}, "ec_nixl")
    assert failures(tmp_path, ours=changed) == [
        "c. ec_nixl/connector.py reads nothing through 'parallel' (anywhere): "
        "update READS in integration.compat.reads"
    ]


def test_the_command_exits_nonzero_and_names_each_failure(tmp_path, capsys):
    root = write_release(tmp_path, {GPU_WORKER: None})
    assert main(["--sources", str(root)]) == 1
    out = capsys.readouterr().out
    failed = re.search(r"1 of (\d+) checks FAIL:\n  - e. nothing calls start_worker_services", out)
    assert failed
    write_release(tmp_path)
    assert main(["--sources", str(root)]) == 0
    assert f"all {failed[1]} checks pass" in capsys.readouterr().out


# ---- the releases' sdists -------------------------------------------------------------


def fake_sdist(tmp_path: Path, version: str, files: dict[str, bytes]) -> vllm_release.Release:
    """A release of our own making, as a file:// sdist."""
    sdist = tmp_path / "pypi" / f"vllm-{version}.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(f"vllm-{version}/{path}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    return vllm_release.Release(version, sdist.as_uri(), digest)


def test_an_sdist_is_fetched_once_and_read_member_by_member(tmp_path, monkeypatch, capsys):
    release = fake_sdist(tmp_path, "9.9.9", {"vllm/a.py": b"A = 1\n", "README": b"hi"})
    monkeypatch.setitem(vllm_release.RELEASES, "9.9.9", release)
    cache = tmp_path / "cache"
    assert vllm_release.read_member("9.9.9", "vllm/a.py", cache) == b"A = 1\n"
    assert "fetching vllm-9.9.9.tar.gz" in capsys.readouterr().err
    found = vllm_release.read_members("9.9.9", lambda path: path.endswith(".py"), cache)
    assert found == {"vllm/a.py": b"A = 1\n"}
    assert capsys.readouterr().err == ""  # from the cache
    assert sorted(p.name for p in cache.iterdir()) == ["vllm-9.9.9.tar.gz"]
    with pytest.raises(vllm_release.ReleaseError, match="has no file vllm/b.py"):
        vllm_release.read_member("9.9.9", "vllm/b.py", cache)


def test_an_sdist_that_does_not_match_its_pin_is_not_kept(tmp_path, monkeypatch):
    release = fake_sdist(tmp_path, "9.9.9", {"vllm/a.py": b"A = 1\n"})
    forged = vllm_release.Release("9.9.9", release.url, "0" * 64)
    monkeypatch.setitem(vllm_release.RELEASES, "9.9.9", forged)
    cache = tmp_path / "cache"
    with pytest.raises(vllm_release.ReleaseError, match="not the pinned 0000"):
        vllm_release.sdist("9.9.9", cache)
    assert list(cache.iterdir()) == []


def test_a_release_that_is_not_pinned_is_refused():
    with pytest.raises(vllm_release.ReleaseError, match=r"not pinned .*known: 0\.32\.0"):
        vllm_release.release("0.31.0")


def test_the_stock_proxy_of_a_release_is_read_from_its_sdist_and_checked(tmp_path, monkeypatch):
    proxy = b"print('proxy')\n"
    release = fake_sdist(tmp_path, "9.9.9", {stock_proxy.MEMBER: proxy})
    monkeypatch.setitem(vllm_release.RELEASES, "9.9.9", release)
    monkeypatch.setitem(stock_proxy.PROXY_SHA256, "9.9.9", hashlib.sha256(proxy).hexdigest())
    cache = tmp_path / "cache"
    path = stock_proxy.fetch("9.9.9", cache)
    assert path == cache / "vllm-9.9.9-disagg_epd_proxy.py" and path.read_bytes() == proxy
    monkeypatch.setitem(stock_proxy.PROXY_SHA256, "9.9.9", "0" * 64)
    path.unlink()
    with pytest.raises(vllm_release.ReleaseError, match="does not have the pinned SHA-256"):
        stock_proxy.fetch("9.9.9", cache)
    assert not path.exists()


def test_every_stock_proxy_pinned_belongs_to_a_pinned_release():
    assert set(stock_proxy.PROXY_SHA256) <= set(vllm_release.RELEASES)
    assert stock_proxy.DEFAULT_VLLM in stock_proxy.PROXY_SHA256
