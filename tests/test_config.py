"""Configuration: validation names the file, the field and the expectation; env overrides apply."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import settings
from appliance.config import ConfigError, load, parse, save_settings
from appliance.repository import RepositoryError, load_model_file
from tests.conftest import ROOT, make_repository, self_signed


def write(tmp: Path, text: str) -> Path:
    p = tmp / "appliance.yaml"
    p.write_text(text)
    return p


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "server: {port: 9001}\nmodel_repository: models\n"), env={})
    assert cfg.server.port == 9001
    assert cfg.server.host == "127.0.0.1"
    assert cfg.model_repository == tmp_path / "models"
    # The serving process hands the GIL on after 0.5 ms, not Python's 5 (README, Performance).
    assert cfg.server.gil_switch_interval_ms == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {prot: 1}\n", "appliance.yaml: server.prot: unknown key"),
        ("server: {port: high}\n", "appliance.yaml: server.port"),
        ("server: {port: 70000}\n", "less than or equal to 65535"),
        ("server: {gil_switch_interval_ms: 0}\n", "server.gil_switch_interval_ms"),
        # YAML's true/false are not numbers (pydantic took `port: true` for port 1), and a switch
        # is true or false, not 1 or "yes": as strict as the settings registry.
        ("server: {port: true}\n", "server.port: input should be an integer, not true or false"),
        ("admin: {port: false}\n", "admin.port: input should be an integer, not true or false"),
        ("server: {max_connections: true}\n", "server.max_connections: input should be an integer"),
        ("server: {drain_timeout_s: true}\n", "server.drain_timeout_s: input should be a number"),
        # .inf let a drain wait for ever; NaN passes no bound.
        (
            "server: {drain_timeout_s: .inf}\n",
            "server.drain_timeout_s: input should be a finite number, got inf",
        ),
        (
            "server: {read_timeout_s: .nan}\n",
            "server.read_timeout_s: input should be a finite number, got nan",
        ),
        (
            "auth: {keys: [{name: a, hash: h, max_priority: true}]}\n",
            "auth.keys.0.max_priority: input should be an integer",
        ),
        ("auth: {metrics_public: 1}\n", "auth.metrics_public: input should be a valid boolean, got 1"),
        ("auth: {required: 'yes'}\n", "auth.required: input should be a valid boolean"),
        ("colour: blue\n", "appliance.yaml: colour: unknown key"),
        (
            "defaults: {batching: {max_batch_size: 0}}\n",
            "defaults.batching.max_batch_size: expected an integer from 1 to 1024, got 0",
        ),
        ("defaults: {batching: {max_batchsize: 4}}\n", "defaults.batching.max_batchsize: unknown setting"),
        (
            "models: {m: {queue: {allow_timeout_override: 3}}}\n",
            "models.m.queue.allow_timeout_override: expected true or false",
        ),
        ("[1, 2]\n", "expected a mapping"),
        ("server: [\n", "not valid YAML"),
    ],
)
def test_errors_name_file_field_and_expectation(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text), env={})
    assert message in str(err.value)


def test_environment_overrides(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, "server: {port: 9001}\n"),
        env={"APPLIANCE_PORT": "9100", "APPLIANCE_HOST": "0.0.0.0", "APPLIANCE_DATA_DIR": "/srv/x"},
    )
    assert (cfg.server.port, cfg.server.host, str(cfg.data_dir)) == (9100, "0.0.0.0", "/srv/x")
    # The documented meanings stay: admin.port -1 turns admin TCP off, 0 picks a free port.
    bounds = load(write(tmp_path, "server: {port: 0}\nadmin: {port: -1}\n"), env={})
    assert (bounds.server.port, bounds.file.admin.port) == (0, -1)
    with pytest.raises(ConfigError, match=r"APPLIANCE_PORT \(overrides server.port\)"):
        parse({}, None, env={"APPLIANCE_PORT": "eighty"})


def test_check_config_reports_every_problem_the_repository_reveals(tmp_path: Path) -> None:
    """What the file alone cannot tell: default models and overrides that name no model, a
    repository that is not there, a broken model file (found by a new user: each said "ok")."""
    repo = tmp_path / "engines"
    (repo / "broken").mkdir(parents=True)
    (repo / "broken" / "model.yaml").write_text("name: broken\nkind: sorcery\n")
    cfg = write(
        tmp_path,
        "model_repository: engines\nserver: {default_models: [nope]}\nmodels: {ghost: {queue: {aging_ms: 5}}}\n",
    )
    run = [sys.executable, "-m", "appliance", "--config", str(cfg), "check-config"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "broken/model.yaml: kind" in out.stderr
    assert "server.default_models: no model 'nope'" in out.stderr
    assert "models.ghost: no model 'ghost'" in out.stderr
    write(tmp_path, "model_repository: nowhere\n")
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "nowhere is not a folder" in out.stderr


def test_models_list_fails_on_what_check_config_fails_on(
    tmp_path: Path, minilm_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a new user: `models list --repository /nonexistent` printed the error, exit 0."""
    from appliance.cli import main

    cfg = write(tmp_path, "model_repository: engines\n")
    assert main(["--config", str(cfg), "models", "list", "--repository", str(tmp_path / "nowhere")]) == 2
    assert f"model_repository: {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    repo = make_repository(tmp_path, {"all-minilm-l6-v2": minilm_folder})
    (repo / "broken").mkdir()
    (repo / "broken" / "model.yaml").write_text("name: broken\nkind: sorcery\n")
    assert main(["--config", str(cfg), "models", "list"]) == 2
    out = capsys.readouterr()
    assert "broken/model.yaml: kind" in out.err
    assert "all-minilm-l6-v2" in out.out, "the broken file hides no other model"


@pytest.mark.parametrize(
    "case", ["no cert file", "not a cert", "not its key", "key alone", "passphrase", "host", "data_dir"]
)
def test_what_serve_trips_on_at_start_names_the_setting_and_check_config_finds_it_first(
    tmp_path: Path, case: str
) -> None:
    """Found by a new user: check-config said ok, then serve stopped with "No such file or
    directory", "[SSL] PEM lib" or "Name or service not known", naming no setting or file."""
    (tmp_path / "engines").mkdir()
    (tmp_path / "hostname.txt").write_text("box\n")
    raw: dict[str, Any] = {
        "server": {"port": 0, "default_models": []},
        "admin": {"port": -1, "socket": ""},
        "model_repository": "engines",
        "data_dir": "data",
    }
    if case == "no cert file":
        raw["tls"] = {"certificate": "missing.pem", "key": "missing.key"}
        expected = f"tls.certificate: {tmp_path / 'missing.pem'}: No such file or directory"
    elif case == "not a cert":
        raw["tls"] = {"certificate": "hostname.txt", "key": "hostname.txt"}
        expected = f"tls.certificate: {tmp_path / 'hostname.txt'}: not a PEM certificate"
    elif case == "key alone":  # TLS half configured had served plain HTTP without a word
        raw["tls"] = {"key": "hostname.txt"}
        expected = "tls.certificate: required when tls.key is set"
    elif case in ("not its key", "passphrase"):
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        self_signed(cert, key, passphrase="secret" if case == "passphrase" else None)
        if case == "passphrase":  # OpenSSL prompted on the terminal, which a service has not
            raw["tls"] = {"certificate": "cert.pem", "key": "key.pem"}
            expected = f"tls.key: {key}: not the PEM private key of tls.certificate {cert}"
        else:
            raw["tls"] = {"certificate": "cert.pem", "key": "hostname.txt"}
            expected = (
                f"tls.key: {tmp_path / 'hostname.txt'}: not the PEM private key of tls.certificate {cert}"
            )
    elif case == "host":
        raw["server"]["host"] = "not.a.host.invalid"  # .invalid never resolves (RFC 2606)
        expected = "server.host: not.a.host.invalid: "
    else:
        raw["data_dir"] = "hostname.txt/data"  # under a file: it cannot be made
        expected = (
            f"data_dir: {tmp_path / 'hostname.txt' / 'data'} is not a writable folder (Not a directory)"
        )
    cfg = write(tmp_path, yaml.safe_dump(raw))
    run = [sys.executable, "-m", "appliance", "--config", str(cfg)]
    checked = subprocess.run([*run, "check-config"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert checked.returncode == 2 and f"appliance: {cfg}: {expected}" in checked.stderr, checked.stderr
    assert not (tmp_path / "data").exists(), "check-config makes no data_dir (nor any other folder)"
    # stdin closed: a prompt for a passphrase fails rather than waits (here as under systemd)
    served = subprocess.run(
        [*run, "serve"], capture_output=True, text=True, cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL
    )
    assert served.returncode == 2, served.stderr[-2000:]
    assert f"\nappliance: {expected}" in "\n" + served.stderr and "Traceback" not in served.stderr, (
        served.stderr
    )


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load(tmp_path / "nope.yaml", env={})


def test_precedence_registry_then_defaults_then_model_then_operator(tmp_path: Path) -> None:
    cfg = parse(
        {
            "defaults": {"batching": {"max_batch_size": 8, "max_queue_delay_ms": 3}},
            "models": {"m": {"batching": {"max_batch_size": 4}}},
        },
        env={},
    )
    values = cfg.tunables_for("m", {"batching.max_batch_size": 16, "queue.max_queue_size": 7})
    assert values["batching.max_batch_size"] == 4  # operator override wins
    assert values["batching.max_queue_delay_ms"] == 3  # server-wide default
    assert values["queue.max_queue_size"] == 7  # model.yaml
    assert values["queue.aging_ms"] == settings.REGISTRY["queue.aging_ms"].default
    # One setting alone (the keep-alive check's per-second read) follows the same precedence.
    model_yaml = {"batching.max_batch_size": 16, "queue.max_queue_size": 7}
    assert {name: cfg.setting_for("m", model_yaml, name) for name in values} == values


def test_overrides_are_saved_atomically_with_a_backup(tmp_path: Path) -> None:
    path = write(tmp_path, "# operator's comment\nserver: {port: 9001}\n")
    cfg = load(path, env={})
    save_settings(cfg, cfg.defaults, {"m": {"batching.max_batch_size": 4}})
    again = load(path, env={})
    assert again.model_overrides == {"m": {"batching.max_batch_size": 4}}
    assert again.server.port == 9001
    assert "operator's comment" in (tmp_path / "appliance.yaml.bak").read_text()


def test_a_rewritten_config_keeps_its_mode(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9001}\n")
    path.chmod(0o660)
    save_settings(load(path, env={}), {}, {"m": {"batching.max_batch_size": 4}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o660


def test_model_yaml_validation_names_the_folder_and_field(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.yaml").write_text("name: m\nkind: embedding\nbatching: {max_batch_size: -1}\n")
    with pytest.raises(RepositoryError, match="m/model.yaml: batching.max_batch_size"):
        load_model_file(folder / "model.yaml")
    (folder / "model.yaml").write_text("name: other\nkind: embedding\n")
    with pytest.raises(RepositoryError, match="must equal the folder name"):
        load_model_file(folder / "model.yaml")
    (folder / "model.yaml").write_text("name: m\nkind: sorcery\n")
    with pytest.raises(RepositoryError, match="m/model.yaml: kind"):
        load_model_file(folder / "model.yaml")
    (folder / "model.yaml").write_text("name: m\nkind: tensor\nartefacts: {model: ../x.onnx}\n")
    with pytest.raises(RepositoryError, match="inside the model folder"):
        load_model_file(folder / "model.yaml")


def test_shipped_config_and_models_are_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load(root / "appliance.yaml", env={})
    names = {p.parent.name for p in cfg.model_repository.glob("*/model.yaml")}
    assert {"all-minilm-l6-v2", "smollm2-135m-instruct"} <= names
    for n in names:
        load_model_file(cfg.model_repository / n / "model.yaml")


def test_readme_configuration_reference_matches_the_registry() -> None:
    import appliance.api.app  # noqa: F401  (registers every section)

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert settings.markdown_table() in readme, "run `appliance settings --update-readme README.md`"


def test_keys_are_not_saved_into_an_empty_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an operator-side probe: `appliance keys add` on an empty file (caught mid-write,
    or truncated) wrote one holding only auth.keys. It is refused in one line, exit 2, as a
    reload refuses the file; nothing is written."""
    from appliance.cli import main

    path = write(tmp_path, "")
    assert main(["--config", str(path), "keys", "add", "app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "appliance.yaml: the file is empty" in err, err
    assert path.read_text() == "" and not (tmp_path / "appliance.yaml.bak").exists()


def test_the_backup_keeps_the_last_hand_written_file_across_processes(tmp_path: Path) -> None:
    """`appliance keys add` (its own process) after a settings save, then a save by a restarted
    server: neither knows what the other wrote, and the .bak still holds the operator's file,
    because the program's copy says so itself (a digest on its first line)."""
    from appliance.config import save_keys

    path = write(tmp_path, "# operator's comment\nserver: {port: 9001}\n")
    bak = tmp_path / "appliance.yaml.bak"
    save_settings(load(path, env={}), {}, {"m": {"batching.max_batch_size": 4}})
    save_keys(load(path, env={}), [])
    save_settings(load(path, env={}), {}, {"m": {"batching.max_batch_size": 8}})
    assert "operator's comment" in bak.read_text()
    again = load(path, env={})
    assert again.server.port == 9001 and again.model_overrides == {"m": {"batching.max_batch_size": 8}}
    # One character changed by hand, and it is the operator's file again.
    path.write_text(path.read_text().replace("9001", "9002"))
    save_keys(load(path, env={}), [])
    assert "9002" in bak.read_text() and "operator's comment" not in bak.read_text()


# A file that parses with PyYAML's own loader but not into anything Python holds: an integer past
# the 4,300-digit conversion limit (ValueError), flow collections thousands deep (RecursionError).
HOSTILE = {
    "huge-int": ("batching", "{max_batch_size: 1" + "0" * 5000 + "}"),
    "deep-map": ("default_response", "{a: " * 3000 + "1" + "}" * 3000),
    "deep-list": ("default_response", "[" * 5000 + "]" * 5000),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_file_python_cannot_hold_is_one_error_naming_it(tmp_path: Path, case: str) -> None:
    """Every failure to parse a model.yaml or appliance.yaml is the reader's own error naming the
    file: a 5,000-digit integer or a deep nesting escaped as a traceback that stopped the server."""
    key, value = HOSTILE[case]
    folder = tmp_path / case
    folder.mkdir()
    (folder / "model.yaml").write_text(f"name: {case}\nkind: tensor\n{key}: {value}\n")
    with pytest.raises(RepositoryError, match=f"{case}/model.yaml: ") as refused:
        load_model_file(folder / "model.yaml")
    assert "set_int_max_str_digits" not in str(refused.value)  # advice no user can act on
    with pytest.raises(ConfigError, match="appliance.yaml: "):
        load(write(tmp_path, f"defaults: {{{key}: {value}}}\n"), env={})


def test_check_config_lists_a_hostile_model_file_and_the_other_models(tmp_path: Path) -> None:
    """check-config crashed (exit 1, a traceback) on a file only Python's int limit refuses."""
    repo = tmp_path / "engines"
    for case, (key, value) in HOSTILE.items():
        (repo / case).mkdir(parents=True)
        (repo / case / "model.yaml").write_text(f"name: {case}\nkind: tensor\n{key}: {value}\n")
    (repo / "fine").mkdir()
    (repo / "fine" / "model.yaml").write_text("name: fine\nkind: tensor\n")
    cfg = write(tmp_path, "model_repository: engines\n")
    run = [sys.executable, "-m", "appliance", "--config", str(cfg), "check-config"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert all(f"{case}/model.yaml" in out.stderr for case in HOSTILE), out.stderr
    assert "fine/model.yaml" not in out.stderr


@pytest.mark.parametrize("name", ["breaker.window_s", "breaker.open_duration_s", "engine.timeout_ms"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_setting_is_a_finite_number(tmp_path: Path, name: str, value: str) -> None:
    """NaN passes every range comparison: ``.nan`` in a model.yaml made each request of the model
    a 500, and in appliance.yaml's defaults half a reload's models. Refused, naming the setting."""
    section, key = name.split(".")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.yaml").write_text(f"name: m\nkind: tensor\n{section}: {{{key}: {value}}}\n")
    with pytest.raises(RepositoryError, match=f"m/model.yaml: {name}: expected a number"):
        load_model_file(folder / "model.yaml")
    with pytest.raises(ConfigError, match=f"defaults.{name}: expected a number"):
        load(write(tmp_path, f"defaults: {{{section}: {{{key}: {value}}}}}\n"), env={})
    with pytest.raises(settings.SettingError, match=name):
        settings.validate({name: 10**400})  # no float holds it


def test_a_reload_with_a_nan_setting_changes_nothing(tmp_path: Path) -> None:
    """A reload validates every value before it applies any: a NaN window made a partial apply."""
    from appliance.server import Server

    (tmp_path / "engines").mkdir()
    path = write(tmp_path, "model_repository: engines\ndefaults: {breaker: {window_s: 20}}\n")
    server = Server(load(path, env={}))
    write(
        tmp_path, "model_repository: engines\ndefaults: {breaker: {window_s: .nan}, queue: {aging_ms: 5}}\n"
    )
    assert server.reload() is False
    assert server.cfg.defaults == {"breaker.window_s": 20.0}
