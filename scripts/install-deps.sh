#!/usr/bin/env bash
# Install what Arceus needs to build, test and run.
#   Debian/Ubuntu: installs the packages below with apt-get (as root, or via sudo).
#   macOS: prints the Homebrew command.
# Installs only what is missing, so it is quick to run again.
set -euo pipefail

DEBIAN_PACKAGES=(
    build-essential pkg-config
    libopenblas-openmp-dev      # the system BLAS PyTorch's references and baseline load (the engine has its own products)
    libcjson-dev zlib1g-dev libssl-dev openssl      # openssl: scripts/make-tls-cert.sh
    libgrpc-dev libprotobuf-c-dev protobuf-c-compiler   # the pipeline over gRPC
    libsqlite3-dev libmicrohttpd-dev                    # the market and its dashboard
    libcriterion-dev                                    # unit tests
    clang libclang-rt-dev libomp-dev                    # libFuzzer harnesses (make fuzz)
    python3-torch python3-numpy python3-pytest python3-grpcio  # reference numerics, e2e tests
    dataset-fashion-mnist                               # the default data set
    chromium                                            # headless, for the dashboard's e2e test
)

if [ "$(uname)" = "Darwin" ]; then
    echo "On macOS, install the dependencies with Homebrew:"
    echo "  brew install pkg-config libomp cjson zlib openssl grpc protobuf-c sqlite libmicrohttpd criterion"
    echo "  python3 -m pip install torch numpy pytest grpcio"
    echo "The dashboard's end-to-end test drives a headless chromium found on PATH."
    echo "Fashion-MNIST: download the four"
    echo "*-ubyte.gz files into a folder and pass it with --data."
    exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: this script knows Debian/Ubuntu (apt) and macOS; install the" >&2
    echo "equivalents of: ${DEBIAN_PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

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
