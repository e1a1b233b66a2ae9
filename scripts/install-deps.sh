#!/usr/bin/env bash
# Install what Arceus needs.
#
#   scripts/install-deps.sh              everything: building, running and the tests
#   scripts/install-deps.sh --runtime    only what building and running need (make demo,
#                                        make demo-lm, make install): no PyTorch, no
#                                        Chromium, no fuzzing toolchain
#   scripts/install-deps.sh [--runtime] --print
#                                        list that set's packages, one a line, installing
#                                        nothing (stderr says which are missing here)
#
#   Debian/Ubuntu: installs the missing packages with apt-get (as root, or via sudo).
#   macOS: prints the Homebrew command.
# Installs only what is missing, so it is quick to run again.
set -euo pipefail

RUNTIME=0
PRINT=0
for arg in "$@"; do
    case $arg in
    --runtime) RUNTIME=1 ;;
    --print) PRINT=1 ;;
    -h | --help)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: scripts/install-deps.sh [--runtime] [--print]" >&2
        exit 2
        ;;
    esac
done

# Building and running: the compiler, the libraries arceus links, the demo's data
RUNTIME_PACKAGES=(
    build-essential pkg-config
    libcjson-dev zlib1g-dev libssl-dev openssl      # openssl: scripts/make-tls-cert.sh
    libgrpc-dev libprotobuf-c-dev protobuf-c-compiler   # the pipeline over gRPC
    libsqlite3-dev libmicrohttpd-dev                    # the market and its dashboard
    dataset-fashion-mnist                               # the default data set (make demo)
)
# The tests, the fuzzers and the references on top
TEST_PACKAGES=(
    libcriterion-dev                                    # unit tests
    libopenblas-openmp-dev      # the system BLAS PyTorch's references and baseline load (the engine has its own products)
    clang libclang-rt-dev libomp-dev                    # libFuzzer harnesses (make fuzz)
    python3-torch python3-numpy python3-pytest python3-grpcio  # reference numerics, e2e tests
    python3-pytest-xdist                                # e2e tests two at a time
    chromium                                            # headless, for the dashboard's e2e test
    man-db                                              # man -l on the installed pages (make install's test)
    iproute2 nftables                                   # the NAT scene: tests/e2e/test_nat.py, demo.sh --nat
)

DEBIAN_PACKAGES=("${RUNTIME_PACKAGES[@]}")
[ "$RUNTIME" = 1 ] || DEBIAN_PACKAGES+=("${TEST_PACKAGES[@]}")

if [ "$(uname)" = "Darwin" ]; then
    if [ "$RUNTIME" = 1 ]; then
        echo "On macOS, install what building and running need with Homebrew:"
        echo "  brew install pkg-config libomp cjson zlib openssl grpc protobuf-c sqlite libmicrohttpd"
    else
        echo "On macOS, install the dependencies with Homebrew:"
        echo "  brew install pkg-config libomp cjson zlib openssl grpc protobuf-c sqlite libmicrohttpd criterion"
        echo "  python3 -m pip install torch numpy pytest pytest-xdist grpcio"
        echo "The dashboard's end-to-end test drives a headless chromium found on PATH."
    fi
    echo "Fashion-MNIST: download the four"
    echo "*-ubyte.gz files into a folder and pass it with --data."
    exit 0
fi

installed() {
    command -v dpkg-query >/dev/null 2>&1 &&
        dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if [ "$PRINT" = 1 ]; then
    printf '%s\n' "${DEBIAN_PACKAGES[@]}"
    if [ ${#missing[@]} -eq 0 ]; then
        echo "install-deps: all ${#DEBIAN_PACKAGES[@]} are installed here" >&2
    else
        echo "install-deps: ${#missing[@]} of ${#DEBIAN_PACKAGES[@]} missing here: ${missing[*]}" >&2
    fi
    exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: this script knows Debian/Ubuntu (apt) and macOS; install the" >&2
    echo "equivalents of: ${DEBIAN_PACKAGES[*]}" >&2
    exit 1
fi

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: everything is installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
