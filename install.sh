#!/bin/sh
# Install, upgrade or remove the appliance inference server on one Linux box.
#
#   sudo sh install.sh                  install or upgrade (keeps config, keys and data)
#   sudo sh install.sh --uninstall      remove the program, keep /etc/appliance and data
#   sh install.sh --prefix DIR --cpu    unprivileged self-contained install under DIR
#   sh install.sh --help                every option
#
# Run it from the unpacked source tree: it installs the package that sits next to it.
# Everything lives inside main(), called on the last line, so a truncated download cannot
# run half a script.

set -eu

usage() {
    cat <<'EOF'
Usage: sh install.sh [options]

  --prefix DIR   install under DIR (DIR/opt/appliance, DIR/etc/appliance, DIR/var/lib/appliance)
                 without root: no system user, no systemd; paths in the config point into DIR
  --dry-run      print every action and change nothing
  --cpu          do not install GPU packages, even when an NVIDIA GPU is present
  --gpu          install the GPU packages even when no NVIDIA GPU is found
                 (with --dry-run: print the whole GPU plan on any box)
  --cuda MAJOR   the CUDA major (12 or 13) of the GPU packages; default: what the driver
                 reports (nvidia-smi), or 12 when there is no driver to ask
  --wheels DIR   take the GPU packages from wheels in DIR, not the network (air-gapped
                 boxes; TensorRT's libraries otherwise come from NVIDIA's index)
  --no-start     install and enable the service but do not (re)start it
  --no-models    do not pull the default models
  --uninstall    remove the program and the service; config and data are kept
  --purge        with --uninstall: also remove config, data, models and the system user
  -v, --verbose  print each command as it runs
  -h, --help     this help

Environment:
  DESTDIR                  stage files under DESTDIR (for packaging); implies --no-start and
                           --no-models, no user or ownership changes
  PYTHON                   the Python (>= 3.10, with venv) to build the virtualenv from
  APPLIANCE_PIP_ARGS       extra pip arguments, e.g. "--no-index --find-links /media/wheels"
                           for an offline install
  APPLIANCE_NVIDIA_INDEX   NVIDIA's package index (default https://pypi.nvidia.com)
  APPLIANCE_READY_TIMEOUT  seconds to wait for the server to report ready (default 300)
EOF
}

# ---------------------------------------------------------------- output helpers

say() { printf '%s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# The words of a command as a shell would need them pasted: a dry run's lines can be run as
# printed (unquoted, "pkg>=1,<2" would be two redirections).
quoted() {
    out=""
    for word in "$@"; do
        case "$word" in
            "" | *[!A-Za-z0-9_./:=@%+,-]*)
                word="'$(printf '%s' "$word" | sed "s/'/'\\\\''/g")'" ;;
        esac
        out="$out${out:+ }$word"
    done
    printf '%s' "$out"
}

# Every change to the system goes through run or write_file, which is what makes
# --dry-run complete.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '[dry-run] %s\n' "$(quoted "$@")"
        return 0
    fi
    if [ "$VERBOSE" = 1 ]; then
        printf '+ %s\n' "$(quoted "$@")"
    fi
    "$@"
}

# write_file PATH MODE [SOURCE], content on stdin. Written to a temp file and renamed, so a
# full disk or an interrupt never leaves a half-written config behind. A dry run shows the
# content, or just names SOURCE for a file copied from the source tree.
write_file() {
    if [ "$DRY_RUN" = 1 ]; then
        if [ $# -ge 3 ]; then
            printf '[dry-run] write %s (mode %s) from %s\n' "$1" "$2" "$3"
            cat >/dev/null
        else
            printf '[dry-run] write %s (mode %s):\n' "$1" "$2"
            sed 's/^/[dry-run]     | /'
        fi
        return 0
    fi
    PENDING_TMP="$1.tmp.$$"
    cat >"$PENDING_TMP"
    chmod "$2" "$PENDING_TMP"
    mv -f "$PENDING_TMP" "$1"
    PENDING_TMP=""
}

cleanup() {
    if [ -n "${PENDING_TMP:-}" ]; then
        rm -f "$PENDING_TMP"
    fi
}

# own OWNER:GROUP PATH...: only a system install has a service user to hand files to.
own() {
    if [ "$MANAGE_SYSTEM" = 1 ]; then
        run chown "$@"
    fi
}

# ---------------------------------------------------------------- arguments and paths

parse_args() {
    PREFIX=""
    PREFIX_GIVEN=0
    DRY_RUN=0
    CPU_ONLY=0
    FORCE_GPU=0
    CUDA_MAJOR=""
    WHEELS=""
    NO_START=0
    NO_MODELS=0
    UNINSTALL=0
    PURGE=0
    VERBOSE=0
    while [ $# -gt 0 ]; do
        case $1 in
            --prefix)
                [ $# -ge 2 ] || die "--prefix needs a directory"
                PREFIX=$2
                PREFIX_GIVEN=1
                shift
                ;;
            --prefix=*)
                PREFIX=${1#--prefix=}
                PREFIX_GIVEN=1
                ;;
            --dry-run) DRY_RUN=1 ;;
            --cpu) CPU_ONLY=1 ;;
            --gpu) FORCE_GPU=1 ;;
            --cuda)
                [ $# -ge 2 ] || die "--cuda needs a CUDA major version (12 or 13)"
                CUDA_MAJOR=$2
                shift
                ;;
            --cuda=*) CUDA_MAJOR=${1#--cuda=} ;;
            --wheels)
                [ $# -ge 2 ] || die "--wheels needs a directory of wheel files"
                WHEELS=$2
                shift
                ;;
            --wheels=*) WHEELS=${1#--wheels=} ;;
            --no-start) NO_START=1 ;;
            --no-models) NO_MODELS=1 ;;
            --uninstall) UNINSTALL=1 ;;
            --purge) PURGE=1 ;;
            -v | --verbose) VERBOSE=1 ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                usage >&2
                die "unknown option: $1"
                ;;
        esac
        shift
    done
    if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then
        die "--purge only makes sense with --uninstall"
    fi
    if [ "$FORCE_GPU" = 1 ] && [ "$CPU_ONLY" = 1 ]; then
        die "--gpu and --cpu contradict each other; give one"
    fi
    case $CUDA_MAJOR in
        "" | 12 | 13) ;;
        *) die "--cuda must be 12 or 13 (the CUDA major of NVIDIA's wheels), not '$CUDA_MAJOR'" ;;
    esac
    if [ -n "$WHEELS" ]; then
        [ -d "$WHEELS" ] || die "--wheels $WHEELS: no such directory"
        WHEELS=$(CDPATH='' cd -- "$WHEELS" && pwd -P)
    fi
    if [ "$PREFIX_GIVEN" = 1 ]; then
        [ -n "$PREFIX" ] || die "--prefix needs a directory"
        case $PREFIX in
            /*) ;;
            *) PREFIX="$(pwd)/$PREFIX" ;;
        esac
        while :; do
            case $PREFIX in
                */) PREFIX=${PREFIX%/} ;;
                *) break ;;
            esac
        done
    fi
}

set_paths() {
    # Configured paths: what the config, the unit and the running server see.
    OPT_DIR="$PREFIX/opt/appliance"
    VENV="$OPT_DIR/venv"
    BIN="$VENV/bin/appliance"
    ETC_DIR="$PREFIX/etc/appliance"
    CONFIG="$ETC_DIR/appliance.yaml"
    ENV_FILE="$ETC_DIR/appliance.env"
    STATE_DIR="$PREFIX/var/lib/appliance"
    MODEL_REPO="$STATE_DIR/engines"
    DATA_DIR="$STATE_DIR/data"
    UNIT_DIR="$PREFIX/etc/systemd/system"
    UNIT="$UNIT_DIR/appliance.service"
    CLI_LINK="/usr/local/bin/appliance"
    # Files are written under DESTDIR (packaging) but keep the configured paths inside them.
    D=${DESTDIR:-}

    MANAGE_SYSTEM=0
    if [ -z "$PREFIX" ] && [ -z "$D" ]; then
        MANAGE_SYSTEM=1
    fi
    if [ -n "$D" ]; then
        NO_START=1
        NO_MODELS=1
    fi
    SYSTEMD_RUNNING=0
    if [ -d /run/systemd/system ]; then
        SYSTEMD_RUNNING=1
    fi
}

# ---------------------------------------------------------------- preflight checks

check_platform() {
    [ "$(uname -s)" = Linux ] || die "appliance runs on Linux only (this is $(uname -s))"
    ARCH=$(uname -m)
    case $ARCH in
        x86_64 | amd64) ARCH=x86_64 ;;
        aarch64 | arm64) ARCH=aarch64 ;;
        *) die "unsupported CPU architecture $ARCH (x86_64 and aarch64 are supported)" ;;
    esac
    if [ "$MANAGE_SYSTEM" = 1 ] && [ "$(id -u)" -ne 0 ]; then
        if [ "$DRY_RUN" = 1 ]; then
            warn "not root: a real system install needs sudo (or use --prefix DIR)"
        else
            die "run as root (sudo sh install.sh), or install under a directory with --prefix DIR"
        fi
    fi
}

find_python() {
    PY=""
    no_venv=""
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11 python3.10; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if ! "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            continue
        fi
        # Debian and Ubuntu ship venv without ensurepip unless python3-venv is installed.
        if "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then
            # The real interpreter, not a pyenv or asdf shim that may change under the venv.
            PY=$("$candidate" -c 'import sys; print(sys.executable)')
            break
        fi
        no_venv=$candidate
    done
    if [ -z "$PY" ]; then
        if [ -n "$no_venv" ]; then
            die "$no_venv cannot create virtualenvs: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
        fi
        die "Python >= 3.10 not found: install python3 (3.10 or newer) or set PYTHON=/path/to/python3"
    fi
    PY_VERSION=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    say "Python: $PY ($PY_VERSION)"
}

find_source() {
    if [ -n "${APPLIANCE_SRC:-}" ]; then
        SRC=$APPLIANCE_SRC
    else
        SRC=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
    fi
    if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/systemd/appliance.service" ]; then
        die "no appliance source tree next to this script ($SRC): unpack the release and run its install.sh"
    fi
    VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -n 1)
    say "Source: $SRC (appliance ${VERSION:-unknown})"
}

# Reports what it finds; it never installs or changes a driver.
detect_gpu() {
    GPU=none
    GPU_DESC=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        GPU_DESC=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
        if [ -n "$GPU_DESC" ]; then
            GPU=nvidia
        fi
    fi
    if [ "$GPU" = none ] && command -v lspci >/dev/null 2>&1; then
        GPU_DESC=$(lspci 2>/dev/null | grep -i -E '(vga|3d|display).*nvidia' | head -n 1 || true)
        if [ -n "$GPU_DESC" ]; then
            GPU=nvidia-no-driver
        else
            GPU_DESC=$(lspci 2>/dev/null | grep -i -E '(vga|3d|display)' | grep -i -E 'amd|ati|intel' | head -n 1 || true)
            if [ -n "$GPU_DESC" ]; then
                GPU=other
            fi
        fi
    fi
    case $GPU in
        nvidia) say "GPU: NVIDIA $GPU_DESC" ;;
        nvidia-no-driver)
            say "GPU: $GPU_DESC"
            warn "an NVIDIA GPU is present but nvidia-smi does not work: the driver is missing or not loaded."
            warn "This installer never installs drivers. Install the NVIDIA driver for your distribution,"
            warn "then re-run it (or just restart the service); until then the server runs on the CPU."
            ;;
        other) say "GPU: $GPU_DESC (not NVIDIA: models run on the CPU with ONNX Runtime)" ;;
        *) say "GPU: none found (models run on the CPU with ONNX Runtime)" ;;
    esac
    WANT_GPU=0
    case $GPU in
        nvidia | nvidia-no-driver) WANT_GPU=1 ;;
    esac
    if [ "$CPU_ONLY" = 1 ] && [ "$WANT_GPU" = 1 ]; then
        say "--cpu given: skipping the GPU packages"
        WANT_GPU=0
    fi
    if [ "$FORCE_GPU" = 1 ] && [ "$WANT_GPU" = 0 ]; then
        say "--gpu given: installing the GPU packages anyway"
        WANT_GPU=1
    fi
    if [ "$WANT_GPU" = 1 ]; then
        detect_cuda_major
    fi
}

# The CUDA major of NVIDIA's wheels: what the driver supports. nvidia-smi prints it in its
# banner ("CUDA Version: 12.4"); failing that, driver r580 and newer run CUDA 13. Without a
# driver to ask, 12: CUDA 12 builds also run on a CUDA 13 driver, not the other way round.
detect_cuda_major() {
    CUDA_SOURCE="--cuda"
    if [ -n "$CUDA_MAJOR" ]; then
        return 0
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        CUDA_MAJOR=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1 || true)
        CUDA_SOURCE="the driver (nvidia-smi)"
        if [ -z "$CUDA_MAJOR" ]; then
            driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
            case ${driver%%.*} in
                '' | *[!0-9]*) ;;
                *) if [ "${driver%%.*}" -ge 580 ]; then CUDA_MAJOR=13; else CUDA_MAJOR=12; fi ;;
            esac
            CUDA_SOURCE="driver $driver"
        fi
    fi
    case $CUDA_MAJOR in
        12 | 13) ;;
        "")
            CUDA_MAJOR=12
            CUDA_SOURCE="assumed, no driver to ask; --cuda 13 for a driver >= 580"
            ;;
        *)
            if [ "$CUDA_MAJOR" -gt 13 ]; then
                CUDA_SOURCE="the driver reports CUDA $CUDA_MAJOR; using the newest wheels known here"
                CUDA_MAJOR=13
            else
                CUDA_SOURCE="the driver reports CUDA $CUDA_MAJOR, older than 12"
                warn "the NVIDIA driver supports CUDA $CUDA_MAJOR only; TensorRT 10+ needs CUDA 12: update the driver"
                CUDA_MAJOR=12
            fi
            ;;
    esac
}

# ---------------------------------------------------------------- install steps

ensure_user() {
    if [ "$MANAGE_SYSTEM" = 0 ]; then
        return 0
    fi
    step "Service user"
    if getent passwd appliance >/dev/null 2>&1; then
        say "user appliance exists"
    else
        command -v useradd >/dev/null 2>&1 || die "useradd not found: create a system user 'appliance' by hand and re-run"
        nologin=/bin/false
        for candidate in /usr/sbin/nologin /sbin/nologin; do
            if [ -x "$candidate" ]; then
                nologin=$candidate
                break
            fi
        done
        run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell "$nologin" --comment "appliance inference server" appliance
    fi
    # /dev/dri render nodes (and some NVIDIA setups) are group-gated; the unit picks up the
    # user's groups, so membership only needs to exist where the group does.
    for group in video render; do
        if getent group "$group" >/dev/null 2>&1; then
            run usermod -a -G "$group" appliance
        fi
    done
}

create_dirs() {
    step "Directories"
    run install -d -m 0755 "$D$OPT_DIR"
    run install -d -m 0755 "$D$UNIT_DIR"
    # The config holds key hashes. The service may rewrite it (the admin API persists live
    # tuning there, atomically, so it needs the directory too); nobody else may read it.
    run install -d -m 0770 "$D$ETC_DIR"
    own root:appliance "$D$ETC_DIR"
    for dir in "$STATE_DIR" "$MODEL_REPO" "$DATA_DIR"; do
        run install -d -m 0750 "$D$dir"
        own appliance:appliance "$D$dir"
    done
}

install_venv() {
    step "Python environment ($VENV)"
    if [ -x "$D$VENV/bin/python" ] && "$D$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        say "upgrading the existing virtualenv"
    else
        if [ -e "$D$VENV" ]; then
            # Typically the system Python it was built from was upgraded away.
            warn "the virtualenv at $D$VENV is broken; recreating it"
            run rm -rf "$D$VENV"
        fi
        run "$PY" -m venv "$D$VENV"
    fi
    say "installing appliance[tui] (downloads dependencies; can take a few minutes)"
    # APPLIANCE_PIP_ARGS is split into words on purpose: it carries several pip options.
    # shellcheck disable=SC2086
    run "$D$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        ${APPLIANCE_PIP_ARGS:-} --upgrade "${SRC}[tui]" ||
        die "pip could not install appliance (see above)"
    GPU_RESULTS=""
    if [ "$WANT_GPU" = 1 ]; then
        install_gpu
    fi
    if [ -n "$D" ]; then
        relocate_venv
    fi
}

# ---------------------------------------------------------------- GPU packages

# The GPU plan, one pip step per engine so that one failing leaves the others (and the CPU
# engine) working: the server picks TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU
# per model, and says which it uses and why. All wheels match the driver's CUDA major.
gpu_plan() {
    if [ "$CUDA_MAJOR" = 12 ]; then
        CUDA_SPEC="cuda-python>=12.3,<13"
    else
        CUDA_SPEC="cuda-python>=13.0,<14"
    fi
    # onnxruntime-gpu is built for CUDA 12 up to 1.26 and for CUDA 13 from 1.27 on. Its extras
    # pull CUDA's and cuDNN's runtime libraries as wheels (no CUDA toolkit needed).
    if [ "$CUDA_MAJOR" = 12 ]; then
        ORT_SPEC="onnxruntime-gpu[cuda,cudnn]>=1.18,<1.27"
    else
        ORT_SPEC="onnxruntime-gpu[cuda,cudnn]>=1.27"
    fi
    # TensorRT 10.x and 11.x both run here. tensorrt-cuNN-libs is a stub on PyPI that fetches
    # the libraries from NVIDIA's index when it installs.
    TRT_SPEC="tensorrt-cu$CUDA_MAJOR>=10,<12"
    NVIDIA_INDEX=${APPLIANCE_NVIDIA_INDEX:-https://pypi.nvidia.com}
    if [ -n "$WHEELS" ]; then
        TRT_SOURCE="wheels in $WHEELS"
    else
        TRT_SOURCE="PyPI, libraries from $NVIDIA_INDEX"
    fi
    say "GPU plan for CUDA $CUDA_MAJOR ($CUDA_SOURCE):"
    say "  1. CUDA bindings and NVML:  $CUDA_SPEC nvidia-ml-py>=12.535"
    say "  2. ONNX Runtime CUDA:       $ORT_SPEC, in place of onnxruntime (the two collide)"
    say "  3. TensorRT:                $TRT_SPEC ($TRT_SOURCE)"
    if [ -z "$WHEELS" ]; then
        say "  Air-gapped? Fetch them elsewhere, then install with --wheels DIR:"
        say "    pip download -d DIR --extra-index-url $NVIDIA_INDEX '$CUDA_SPEC' nvidia-ml-py '$ORT_SPEC' '$TRT_SPEC'"
    fi
}

# gpu_pip ARGS...: pip install into the venv, from --wheels DIR when given (nothing from the
# network then), else with APPLIANCE_PIP_ARGS like the base install.
gpu_pip() {
    if [ -n "$WHEELS" ]; then
        run "$D$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            --no-index --find-links "$WHEELS" "$@"
    else
        # APPLIANCE_PIP_ARGS is split into words on purpose: it carries several pip options.
        # shellcheck disable=SC2086
        run "$D$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            ${APPLIANCE_PIP_ARGS:-} "$@"
    fi
}

# gpu_step NAME COMMAND...: run one step of the plan; on failure say which step and pip's own
# reason, and carry on. GPU_RESULTS collects "NAME: installed|FAILED (why)" for the summary.
gpu_step() {
    name=$1
    shift
    if [ "$DRY_RUN" = 1 ]; then
        "$@"
        return 0
    fi
    log=$(mktemp)
    if "$@" >"$log" 2>&1; then
        GPU_RESULTS="$GPU_RESULTS
  $name: installed"
        rm -f "$log"
        return 0
    fi
    why=$(grep -E 'ERROR|error:' "$log" | tail -n 2 | tr '\n' ' ' || true)
    if [ -z "$why" ]; then
        why=$(tail -n 2 "$log" | tr '\n' ' ')
    fi
    rm -f "$log"
    warn "GPU step '$name' failed: ${why:-pip gave no reason}"
    warn "carrying on without it; models fall back to the next engine (TensorRT, ONNX Runtime CUDA, CPU)"
    GPU_RESULTS="$GPU_RESULTS
  $name: FAILED (${why:-pip gave no reason})"
    return 1
}

install_gpu() {
    step "GPU packages"
    gpu_plan
    gpu_step "CUDA bindings ($CUDA_SPEC)" gpu_pip --upgrade "$CUDA_SPEC" "nvidia-ml-py>=12.535" || true
    # Both distributions install the same `onnxruntime` module: remove both, then install the
    # GPU build; if that fails, put the CPU build back so the server still starts.
    run "$D$VENV/bin/python" -m pip uninstall --quiet -y onnxruntime onnxruntime-gpu
    if ! gpu_step "ONNX Runtime CUDA (onnxruntime-gpu)" gpu_pip "$ORT_SPEC"; then
        # APPLIANCE_PIP_ARGS is split into words on purpose: it carries several pip options.
        # shellcheck disable=SC2086
        run "$D$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            ${APPLIANCE_PIP_ARGS:-} "onnxruntime>=1.18" ||
            die "could not put the CPU onnxruntime back (see above); re-run with --cpu"
    fi
    if [ -n "$WHEELS" ]; then
        gpu_step "TensorRT (tensorrt-cu$CUDA_MAJOR)" gpu_pip "$TRT_SPEC" || true
    else
        gpu_step "TensorRT (tensorrt-cu$CUDA_MAJOR)" gpu_pip --extra-index-url "$NVIDIA_INDEX" "$TRT_SPEC" || true
    fi
}

# A venv hard-codes its own path in script shebangs and activate scripts; a staged install
# must name the final path, not the staging one.
relocate_venv() {
    for file in "$D$VENV"/bin/*; do
        if [ -f "$file" ] && [ ! -L "$file" ] && grep -q "$D$VENV" "$file" 2>/dev/null; then
            run sed -i "s|$D$VENV|$VENV|g" "$file"
        fi
    done
}

write_config() {
    step "Configuration ($CONFIG)"
    if [ -e "$D$CONFIG" ]; then
        say "keeping the existing $CONFIG"
    else
        write_file "$D$CONFIG" 0660 <<EOF
# appliance configuration, written once by install.sh; re-running the installer keeps it.
# Check changes with: appliance --config $CONFIG check-config
# then apply them with: systemctl restart appliance
server:
  host: 0.0.0.0
  port: 8000
model_repository: $MODEL_REPO
data_dir: $DATA_DIR
# API keys (auth.keys) are added by \`appliance keys add NAME\`, which stores only
# their salted hashes here.
EOF
        own root:appliance "$D$CONFIG"
    fi
    if [ -e "$D$ENV_FILE" ]; then
        say "keeping the existing $ENV_FILE"
    else
        write_file "$D$ENV_FILE" 0640 <<'EOF'
# Environment for appliance.service (systemd EnvironmentFile), kept across upgrades.
# One VAR=value per line; takes effect on `systemctl restart appliance`.
#
# These override server.host, server.port and server.log_level in appliance.yaml:
#APPLIANCE_HOST=0.0.0.0
#APPLIANCE_PORT=8000
#APPLIANCE_LOG_LEVEL=info
# Restrict the server to some GPUs:
#CUDA_VISIBLE_DEVICES=0
# Cap CPU threads used by ONNX Runtime / numpy on a shared box:
#OMP_NUM_THREADS=8
EOF
        own root:appliance "$D$ENV_FILE"
    fi
}

# A failed check warns rather than aborts: the service may still start with an older
# config, and the operator sees exactly what to fix.
check_config() {
    CONFIG_OK=1
    if [ -n "$D" ]; then
        # The staged venv cannot run until it sits at its final path.
        return 0
    fi
    if [ "$DRY_RUN" = 1 ]; then
        run "$BIN" --config "$CONFIG" check-config
        return 0
    fi
    if ! "$BIN" --config "$CONFIG" check-config; then
        CONFIG_OK=0
        warn "$CONFIG did not pass 'appliance check-config' (see above)"
    fi
}

pull_models() {
    MODELS_FAILED=""
    step "Default models ($MODEL_REPO)"
    # Each model folder starts from the model.yaml shipped in the source tree; an operator's
    # edited copy is kept on upgrade.
    for spec in "$SRC"/engines/*/model.yaml; do
        [ -f "$spec" ] || continue
        name=$(basename "$(dirname "$spec")")
        if [ ! -e "$D$MODEL_REPO/$name/model.yaml" ]; then
            run install -d -m 0755 "$D$MODEL_REPO/$name"
            run install -m 0644 "$spec" "$D$MODEL_REPO/$name/model.yaml"
        fi
    done
    if [ "$NO_MODELS" = 1 ]; then
        own -R appliance:appliance "$D$MODEL_REPO"
        return 0
    fi
    for model in all-minilm-l6-v2 smollm2-135m-instruct; do
        if ! run "$BIN" --config "$CONFIG" models pull "$model" --repository "$MODEL_REPO"; then
            MODELS_FAILED="$MODELS_FAILED $model"
            warn "could not pull $model; retry later with: $BIN --config $CONFIG models pull $model --repository $MODEL_REPO"
        fi
    done
    # Pulled as root; the server must own what it may rebuild or clean up.
    own -R appliance:appliance "$D$MODEL_REPO"
}

install_unit() {
    step "systemd unit ($UNIT)"
    if [ -z "$PREFIX" ]; then
        write_file "$D$UNIT" 0644 "systemd/appliance.service" <"$SRC/systemd/appliance.service"
    else
        sed -e "s|/opt/appliance|$OPT_DIR|g" -e "s|/etc/appliance|$ETC_DIR|g" \
            -e "s|/var/lib/appliance|$STATE_DIR|g" "$SRC/systemd/appliance.service" |
            write_file "$D$UNIT" 0644 "systemd/appliance.service, paths moved under $PREFIX"
    fi
    if [ "$MANAGE_SYSTEM" = 1 ]; then
        # A convenience link so `appliance ...` works from a root shell; never replace a
        # file or link that someone else put there.
        if [ ! -e "$CLI_LINK" ] && [ ! -L "$CLI_LINK" ]; then
            run ln -s "$BIN" "$CLI_LINK"
        elif [ -L "$CLI_LINK" ] && [ "$(readlink "$CLI_LINK")" = "$BIN" ]; then
            :
        else
            warn "$CLI_LINK exists and is not ours; use $BIN"
        fi
    fi
}

# Prints the key once (the config only ever holds its hash), and only when the box has
# no usable key yet, so upgrades never mint extra keys.
ensure_api_key() {
    API_KEY=""
    if [ -n "$D" ]; then
        return 0
    fi
    if [ "$DRY_RUN" = 1 ]; then
        run "$BIN" --config "$CONFIG" keys add default
        return 0
    fi
    step "API key"
    has_key=$(config_query keys || true)
    case $has_key in
        yes)
            say "an API key already exists (add another with: $BIN --config $CONFIG keys add NAME)"
            return 0
            ;;
        no) ;;
        *)
            warn "could not read $CONFIG to look for API keys; not creating one"
            return 0
            ;;
    esac
    if output=$("$BIN" --config "$CONFIG" keys add default 2>&1); then
        API_KEY=$(printf '%s\n' "$output" | grep -o 'apl_[A-Za-z0-9_-]*' | head -n 1 || true)
        if [ -z "$API_KEY" ]; then
            printf '%s\n' "$output"
        fi
        # The CLI may have rewritten the file; restore the intended owner and mode.
        run chmod 0660 "$CONFIG"
        own root:appliance "$CONFIG"
    else
        printf '%s\n' "$output" >&2
        warn "could not create an API key; create one with: $BIN --config $CONFIG keys add default"
    fi
}

# config_query listen|keys: reads the YAML with the venv's PyYAML (sh cannot parse YAML).
# The listen address follows the server's rules: APPLIANCE_HOST/PORT from the service's
# EnvironmentFile win over server.host/port, whose defaults are 127.0.0.1:8000.
config_query() {
    "$D$VENV/bin/python" - "$D$CONFIG" "$1" "$D$ENV_FILE" 2>/dev/null <<'EOF'
import os
import sys

import yaml

with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f) or {}
if sys.argv[2] == "listen":
    env = {}
    if os.path.exists(sys.argv[3]):
        with open(sys.argv[3]) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and not key.startswith("#"):
                    env[key.strip()] = value.strip().strip("\"'")
    server = cfg.get("server") or {}
    host = env.get("APPLIANCE_HOST") or server.get("host", "127.0.0.1")
    port = env.get("APPLIANCE_PORT") or server.get("port", 8000)
    print(host, port)
else:
    keys = (cfg.get("auth") or {}).get("keys") or []
    print("yes" if any(isinstance(k, dict) and not k.get("revoked") for k in keys) else "no")
EOF
}

read_listen() {
    HOST=0.0.0.0
    PORT=8000
    if [ "$DRY_RUN" = 0 ] && [ -x "$D$VENV/bin/python" ] && [ -f "$D$CONFIG" ]; then
        listen=$(config_query listen || true)
        if [ -n "$listen" ]; then
            HOST=${listen% *}
            PORT=${listen#* }
        fi
    fi
    case $HOST in
        0.0.0.0 | :: | '') PROBE_HOST=127.0.0.1 ;;
        *) PROBE_HOST=$HOST ;;
    esac
    PUBLIC_HOST=$PROBE_HOST
    if [ "$PROBE_HOST" = 127.0.0.1 ]; then
        lan_ip=$(hostname -I 2>/dev/null | awk '{print $1}' || true)
        PUBLIC_HOST=${lan_ip:-$(hostname 2>/dev/null || echo localhost)}
    fi
}

probe() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 3 -o /dev/null "$1" 2>/dev/null
    else
        "$D$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1" 2>/dev/null
    fi
}

start_service() {
    SERVICE_STATE="not started"
    if [ "$MANAGE_SYSTEM" = 0 ]; then
        return 0
    fi
    if [ "$SYSTEMD_RUNNING" = 0 ]; then
        warn "systemd is not running here, so the service was not enabled or started"
        SERVICE_STATE="systemd not running"
        return 0
    fi
    step "Service"
    run systemctl daemon-reload
    run systemctl enable --quiet appliance.service
    if [ "$NO_START" = 1 ]; then
        say "enabled, not started (--no-start); start it with: systemctl restart appliance"
        return 0
    fi
    if [ "${CONFIG_OK:-1}" = 0 ]; then
        warn "not restarting with a config that fails check-config; fix it, then: systemctl restart appliance"
        SERVICE_STATE="config invalid"
        return 0
    fi
    # restart, not start: on an upgrade the running server must pick up the new code.
    # --no-block because we wait on /readyz ourselves, showing the server's STATUS= lines.
    run systemctl restart --no-block appliance.service
    if [ "$DRY_RUN" = 1 ]; then
        return 0
    fi
    wait_ready
}

wait_ready() {
    timeout=${APPLIANCE_READY_TIMEOUT:-300}
    url="http://$PROBE_HOST:$PORT/readyz"
    say "waiting up to ${timeout}s for $url"
    waited=0
    last_status=""
    while [ "$waited" -lt "$timeout" ]; do
        if probe "$url"; then
            SERVICE_STATE=ready
            say "ready after ${waited}s"
            return 0
        fi
        sub_state=$(systemctl show -p SubState --value appliance.service 2>/dev/null || true)
        case $sub_state in
            failed | auto-restart)
                SERVICE_STATE=failed
                warn "the service failed to start; see: journalctl -u appliance -n 50 --no-pager"
                return 0
                ;;
        esac
        status=$(systemctl show -p StatusText --value appliance.service 2>/dev/null || true)
        if [ -n "$status" ] && [ "$status" != "$last_status" ]; then
            say "  $status"
            last_status=$status
        fi
        sleep 2
        waited=$((waited + 2))
    done
    SERVICE_STATE="not ready"
    warn "not ready after ${timeout}s (large models load slowly); follow it with: journalctl -u appliance -f"
}

summary() {
    step "Done"
    if [ "$DRY_RUN" = 1 ]; then
        say "dry run: nothing was changed"
        return 0
    fi
    if [ -n "$D" ]; then
        say "staged under $D$PREFIX (configured for ${PREFIX:-/})"
        return 0
    fi
    say "appliance ${VERSION:-} is installed in $OPT_DIR"
    say "  API:      http://$PUBLIC_HOST:$PORT   (OpenAI-compatible under /v1)"
    if [ -n "$API_KEY" ]; then
        say "  API key:  $API_KEY"
        say "            shown only now: the config keeps a hash. Send it as 'Authorization: Bearer <key>'."
    fi
    # With --config: the console finds the admin socket and token through the server's config,
    # which is ./appliance.yaml only when run from $ETC_DIR (elsewhere: no token, every call a 401).
    console="$BIN --config $CONFIG tui"
    say "  Console:  $console"
    say "  Config:   $CONFIG   (environment: $ENV_FILE)"
    say "  Data:     $STATE_DIR"
    if [ "$MANAGE_SYSTEM" = 1 ]; then
        say "  Service:  $SERVICE_STATE   (logs: journalctl -u appliance -f)"
    else
        say "  Run it:   $BIN --config $CONFIG serve"
    fi
    if [ -n "${GPU_RESULTS:-}" ]; then
        say "  GPU:$GPU_RESULTS"
        say "            each model's engine, and why not a faster one: GET /v1/models/NAME, or $console"
    fi
    if [ -n "${MODELS_FAILED:-}" ]; then
        warn "models not pulled:$MODELS_FAILED"
    fi
    case $SERVICE_STATE in
        failed | "not ready" | "config invalid") return 1 ;;
    esac
    return 0
}

# ---------------------------------------------------------------- uninstall

uninstall() {
    step "Uninstall"
    if [ "$MANAGE_SYSTEM" = 1 ] && [ "$SYSTEMD_RUNNING" = 1 ]; then
        if systemctl cat appliance.service >/dev/null 2>&1; then
            run systemctl disable --now --quiet appliance.service || warn "could not stop the service"
        fi
    fi
    if [ -e "$D$UNIT" ]; then
        run rm -f "$D$UNIT"
    fi
    if [ "$MANAGE_SYSTEM" = 1 ] && [ "$SYSTEMD_RUNNING" = 1 ]; then
        run systemctl daemon-reload
    fi
    if [ "$MANAGE_SYSTEM" = 1 ] && [ -L "$CLI_LINK" ] && [ "$(readlink "$CLI_LINK")" = "$BIN" ]; then
        run rm -f "$CLI_LINK"
    fi
    if [ -e "$D$OPT_DIR" ]; then
        run rm -rf "$D$OPT_DIR"
    fi
    if [ "$PURGE" = 1 ]; then
        run rm -rf "$D$ETC_DIR" "$D$STATE_DIR"
        if [ "$MANAGE_SYSTEM" = 1 ] && getent passwd appliance >/dev/null 2>&1; then
            run userdel appliance || warn "could not remove the user appliance"
        fi
        say "removed the program, config, API keys, models and data"
    else
        say "removed the program; kept $ETC_DIR (config, API keys) and $STATE_DIR (models, data)"
        say "remove those too with: sh install.sh --uninstall --purge${PREFIX:+ --prefix $PREFIX}"
    fi
}

# ---------------------------------------------------------------- main

main() {
    PENDING_TMP=""
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    # Predictable modes for what we create; sensitive files get explicit modes anyway.
    umask 022
    parse_args "$@"
    set_paths
    if [ "$DRY_RUN" = 1 ]; then
        say "dry run: printing the actions, changing nothing"
    fi
    if [ -n "$D" ]; then
        say "Target: staged under DESTDIR=$D"
    elif [ -n "$PREFIX" ]; then
        say "Target: prefix $PREFIX (no system user, no systemd)"
    else
        say "Target: system install"
    fi
    check_platform
    if [ "$UNINSTALL" = 1 ]; then
        uninstall
        return 0
    fi
    find_source
    find_python
    detect_gpu
    ensure_user
    create_dirs
    install_venv
    write_config
    check_config
    pull_models
    install_unit
    ensure_api_key
    read_listen
    start_service
    summary
}

main "$@"
