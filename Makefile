MAKEFLAGS += --no-print-directory
# Arceus build. `make` builds bin/arceus; `make test` runs every test;
# `make bench` runs the benchmarks; `make demo` runs the market demo
# (scripts/demo.sh), `make demo-local` trains the default model here.
#
# BUILD=release (default) or BUILD=asan (AddressSanitizer + UBSan, used by the tests),
# or BUILD=fuzz (clang, libFuzzer coverage + ASan + UBSan: the fuzz/ harnesses, `make fuzz`).
# WERROR=1 turns warnings into errors (CI sets it).

BUILD ?= release
WERROR ?= 0
PYTHON ?= /usr/bin/python3
PKG_CONFIG ?= pkg-config
SHELL := /bin/bash

# pkg-config runs only when a recipe first needs its answer, never while make
# reads this file: `make demo`, `make deps` and `make install` on a fresh
# machine install pkg-config and the libraries before anything asks for them
# (and print no "Package ... was not found" lines before that). Each is asked
# once per make: `lazy` turns a recursive variable into a simple one on first use.
lazy = $(eval $(1) := $$(shell $(2)))$($(1))

# No BLAS: the engine's products are its own (src/core/blas.c); OpenMP runs
# its threads.

PKGS := libcjson zlib grpc gpr libprotobuf-c
PKGS += sqlite3 libcrypto libmicrohttpd
PKG_CFLAGS = $(call lazy,PKG_CFLAGS,$(PKG_CONFIG) --cflags $(PKGS))
PKG_LIBS = $(call lazy,PKG_LIBS,$(PKG_CONFIG) --libs $(PKGS))
CRITERION_LIBS = $(call lazy,CRITERION_LIBS,$(PKG_CONFIG) --libs criterion)
DEP_CFLAGS = $(PKG_CFLAGS)
DEP_LIBS = $(PKG_LIBS) -lgrpc -lgpr -lprotobuf-c -lm -lpthread

CC ?= cc
# protoc-c output (the wire messages of proto/arceus.proto), generated at build time
GEN := build/gen
WARN := -Wall -Wextra -Wshadow -Wno-unused-parameter
ifeq ($(WERROR),1)
WARN += -Werror
endif
CFLAGS_COMMON = -std=c11 -D_GNU_SOURCE -fopenmp $(WARN) -Iinclude -Isrc -I$(GEN) $(DEP_CFLAGS)

ifeq ($(BUILD),asan)
# -O2: the end-to-end tests train under this build, and at -O1 it ran about
# 1.5x slower (sanitizers work at either level)
OPT := -O2 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
# the test build can play a cheating provider (ARCEUS_FAULT, train/pipeline.c);
# the release build has no such code
TEST_DEFS := -DARCEUS_FAULTS
else ifeq ($(BUILD),fuzz)
# The library with libFuzzer's coverage hooks (the harnesses add the fuzzer's main)
CC := clang
OPT := -O1 -g -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined \
       -fno-omit-frame-pointer -Wno-pass-failed
else
OPT := -O3 -march=native -g
endif

CFLAGS = $(CFLAGS_COMMON) $(OPT) $(TEST_DEFS) $(EXTRA_CFLAGS)
LDFLAGS := -fopenmp $(OPT)

OUT := build/$(BUILD)
LIB_SRC := $(wildcard src/core/*.c src/ops/*.c src/nn/*.c src/data/*.c src/train/*.c src/net/*.c src/run/*.c)
LIB_SRC += $(wildcard src/market/*.c)
CLI_SRC := $(wildcard src/cli/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(OUT)/%.o) $(OUT)/gen/arceus.pb-c.o $(OUT)/gen/web_assets.o
CLI_OBJ := $(CLI_SRC:%.c=$(OUT)/%.o)
LIB := $(OUT)/libarceus.a
BIN := $(OUT)/arceus
TEST_SRC := $(wildcard tests/unit/test_*.c)
TEST_BIN := $(TEST_SRC:tests/unit/%.c=$(OUT)/tests/%)
# programs the unit tests run (plain main, no Criterion)
TEST_HELPER_SRC := $(wildcard tests/unit/helper_*.c)
TEST_HELPER_BIN := $(TEST_HELPER_SRC:tests/unit/%.c=$(OUT)/tests/%)

.PHONY: all test unit e2e ref bench bench-quality bench-cpu-limit demo demo-lm demo-nat demo-local clean deps deps-runtime fuzz \
        fuzz-run man install uninstall
# bin/arceus is always the release build (the ASan one stays in build/asan)
ifeq ($(BUILD),release)
all: $(BIN) bin/arceus
else
all: $(BIN)
endif

bin/arceus: $(BIN)
	@mkdir -p bin
	cp $(BIN) bin/arceus.tmp && mv -f bin/arceus.tmp bin/arceus

$(OUT)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

# Generated C stubs: one copy shared by both builds. They are compiled
# without -Werror/-Wextra: their style is protoc-c's, not ours.
$(GEN)/arceus.pb-c.c: proto/arceus.proto
	@mkdir -p $(GEN)
	protoc-c --c_out=$(GEN) -Iproto proto/arceus.proto
$(GEN)/arceus.pb-c.h: $(GEN)/arceus.pb-c.c

$(OUT)/gen/arceus.pb-c.o: $(GEN)/arceus.pb-c.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -I$(GEN) $(DEP_CFLAGS) $(OPT) -w -c $< -o $@

# The dashboard's page (web/) compiled into the binary: a market serves it
# with nothing to install beside it.
WEB_FILES := $(sort $(wildcard web/*.html web/*.js web/*.css web/*.svg))
$(GEN)/web_assets.c: $(WEB_FILES) scripts/embed-web.sh
	@mkdir -p $(GEN)
	scripts/embed-web.sh $@ $(WEB_FILES)

$(OUT)/gen/web_assets.o: $(GEN)/web_assets.c src/market/http.h
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -Isrc $(OPT) -w -c $< -o $@

# everything that includes the generated header waits for it
$(LIB_SRC:%.c=$(OUT)/%.o) $(CLI_OBJ) $(TEST_BIN) $(TEST_HELPER_BIN): | $(GEN)/arceus.pb-c.h

$(LIB): $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BIN): $(CLI_OBJ) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(LIB) $(DEP_LIBS)

$(OUT)/tests/%: tests/unit/%.c $(LIB) $(wildcard tests/unit/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/unit -o $@ $< $(LIB) $(DEP_LIBS) $(CRITERION_LIBS)

$(OUT)/tests/helper_%: tests/unit/helper_%.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB) $(DEP_LIBS)

# PyTorch reference data for the numerics tests (Debian python3-torch).
REF_DIR := build/ref
ref: $(REF_DIR)/.stamp
$(REF_DIR)/.stamp: $(wildcard tests/ref/*.py) $(wildcard configs/*.json)
	@mkdir -p $(REF_DIR)
	$(PYTHON) tests/ref/make_refs.py --out $(REF_DIR)
	@touch $@

# Every test: unit tests under the sanitizers, then the end-to-end tests
# (warnings are errors). Dependencies are installed first if missing; the
# sub-makes then see them through pkg-config.
# The builds run a job per core (TEST_JOBS); the tests keep their own pace.
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
test: deps
	scripts/check-layers.sh
	$(MAKE) -j$(TEST_JOBS) BUILD=asan WERROR=1 unit
	$(MAKE) -j$(TEST_JOBS) BUILD=asan WERROR=1 e2e
	$(MAKE) -j$(TEST_JOBS) BUILD=fuzz WERROR=1 fuzz-run FUZZ_SECONDS=$(TEST_FUZZ_SECONDS)

# libFuzzer harnesses (fuzz/fuzz_*.c) over the hostile-input entry points.
# `make fuzz` replays every committed input (fuzz/corpus, fuzz/regressions),
# then fuzzes each target for FUZZ_SECONDS; it fails on any crash, leak,
# sanitizer report or timeout (the input is left in build/fuzz/crashes/).
# `make test` does the same for TEST_FUZZ_SECONDS per target.
FUZZ_TARGETS := frame spec safetensors idx load restore session audit relay
FUZZ_SECONDS ?= 60
TEST_FUZZ_SECONDS ?= 3
fuzz: deps
	$(MAKE) BUILD=fuzz WERROR=1 fuzz-run

FUZZ_BIN := $(FUZZ_TARGETS:%=$(OUT)/fuzz/fuzz_%)
$(OUT)/fuzz/fuzz_%: fuzz/fuzz_%.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fsanitize=fuzzer -o $@ $< $(LIB) $(DEP_LIBS)

fuzz-run: $(FUZZ_BIN)
	@test "$(BUILD)" = fuzz || { echo "fuzz-run needs BUILD=fuzz (use make fuzz)"; exit 1; }
	fuzz/run.sh $(OUT) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Criterion runs each test in a child process and does not fail on a
# sanitizer report in it, so the output is also searched for one.
unit: $(TEST_BIN) $(TEST_HELPER_BIN) ref
	@set -e; mkdir -p $(OUT)/logs; for t in $(TEST_BIN); do \
	    echo "== $$t"; log=$(OUT)/logs/$$(basename $$t).log; \
	    AR_REF_DIR=$(REF_DIR) ASAN_OPTIONS=detect_leaks=1 $$t --jobs 1 2>&1 | tee $$log; \
	    test $${PIPESTATUS[0]} -eq 0; \
	    if grep -qE "ERROR: (Address|Leak)Sanitizer|runtime error:" $$log; then \
	        echo "sanitizer report in $$t (see $$log)"; exit 1; fi; \
	done

# Defined before the e2e rule: make expands a rule's prerequisites when it
# reads the rule, so a later definition would leave the prerequisite empty.
# The emulated WAN link (bench/wan_relay.c): standalone, used by bench/wan.py
# and the e2e tests of slow links. A test tool, not code under test: always
# the optimized build, whose timing is what the tests check.
WAN_RELAY := build/release/bench/wan_relay
$(WAN_RELAY): bench/wan_relay.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE $(WARN) -O2 -g -o $@ $<

# Three at a time (pytest-xdist, a file's tests kept together on one worker):
# most of an end-to-end test is waiting on processes and sockets, so three
# share the 2 cores of the CI machine well. Those marked `alone` measure a pace or a
# delay and run afterwards, by themselves.
E2E_ENV = ARCEUS_BIN=$(abspath $(BIN)) WAN_RELAY_BIN=$(abspath $(WAN_RELAY))
E2E_JOBS ?= 3
e2e: $(BIN) $(WAN_RELAY)
	$(E2E_ENV) $(PYTHON) -m pytest -q -n $(E2E_JOBS) --dist loadfile -m "not alone" --durations=30 tests/e2e
	$(E2E_ENV) $(PYTHON) -m pytest -q -m alone --durations=10 tests/e2e


$(OUT)/bench/link_bench: bench/link_bench.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB) $(DEP_LIBS)

# The clients of bench/market_load.py: one C process on a gRPC completion
# queue, so that the bench measures the market, not a Python event loop.
$(OUT)/bench/market_loadgen: bench/market_loadgen.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB) $(DEP_LIBS)

bench: deps
	$(MAKE) all $(OUT)/bench/link_bench $(OUT)/bench/market_loadgen $(WAN_RELAY)
	$(PYTHON) bench/run.py --arceus $(abspath $(BIN))
	$(OUT)/bench/link_bench
	$(PYTHON) bench/pipeline.py --arceus $(abspath $(BIN))
	$(PYTHON) bench/wan.py --arceus $(abspath $(BIN)) --relay $(abspath $(WAN_RELAY))
	$(PYTHON) bench/tp.py --arceus $(abspath $(BIN))
	$(PYTHON) bench/audit.py --arceus $(abspath $(BIN))
	$(PYTHON) bench/market_load.py --arceus $(abspath $(BIN)) --loadgen $(abspath $(OUT)/bench/market_loadgen)

# The market demo (scripts/demo.sh): install what is missing, build, start a
# market, three providers and a renter on loopback, train the Fashion-MNIST
# MLP across the three providers through the market, print the plan, the
# accuracy, the ledger and the jobs, stop everything.
demo:
	@scripts/demo.sh

# The headline demo (scripts/demo.sh --lm): the same market and three
# providers, each offering too little memory for the whole gpt-5m language
# model, so the plan splits it over the three; the renter trains it on a
# public-domain text and prints the validation loss, a sample and the ledger.
demo-lm:
	@scripts/demo.sh --lm

# The same behind home routers (scripts/demo.sh --nat; needs root): each
# provider and the renter behind a NAT of its own in a network namespace, the
# market's relay carrying every edge of the plan.
demo-nat:
	@scripts/demo.sh --nat

# The single-machine demo: train the MLP on Fashion-MNIST (Debian's
# dataset-fashion-mnist) here and print the test accuracy.
demo-local: deps-runtime
	$(MAKE) all
	$(BIN) train --model configs/mlp-fashion.json --out runs/mlp-fashion

# The long training-quality runs (about 20 minutes on 2 cores).
bench-quality: deps
	$(MAKE) all
	$(PYTHON) bench/quality.py --arceus $(abspath $(BIN))

# arceus provide --cpu-limit measured (bench/cpu_limit.py, about a minute): a
# provider held to 40% and one with no limit, each kept busy by a renter;
# the share of the machine each used. Not part of `make bench`.
bench-cpu-limit: deps-runtime
	$(MAKE) all
	$(PYTHON) bench/cpu_limit.py --arceus $(abspath $(BIN))

# deps: everything the tests need too; deps-runtime: only building and running
deps:
	@scripts/install-deps.sh

deps-runtime:
	@scripts/install-deps.sh --runtime

# Manual pages, generated from the option tables by the binary itself
# (`arceus --man`, `arceus COMMAND --man`), so they say what the parser does:
# arceus(1) and arceus-COMMAND(1) for every command.
MAN_DIR := $(OUT)/man
man: $(MAN_DIR)/.stamp
$(MAN_DIR)/.stamp: $(BIN)
	@rm -rf $(MAN_DIR) && mkdir -p $(MAN_DIR)
	$(BIN) --man >$(MAN_DIR)/arceus.1
	@set -e; for c in $$($(BIN) --commands); do \
	    echo "$(BIN) $$c --man >$(MAN_DIR)/arceus-$$c.1"; \
	    $(BIN) $$c --man >$(MAN_DIR)/arceus-$$c.1; \
	done
	@touch $@

# make install [PREFIX=/usr/local] [DESTDIR=staging root]: the binary into
# PREFIX/bin, the manual pages into PREFIX/share/man/man1. The binary is the
# one `make` builds (-march=native: for this machine's kind of CPU).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
install: all man
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(BIN) $(DESTDIR)$(BINDIR)/arceus
	install -m 644 $(MAN_DIR)/*.1 $(DESTDIR)$(MANDIR)/man1/
	@echo "installed $(DESTDIR)$(BINDIR)/arceus and $$(ls $(MAN_DIR)/*.1 | wc -l) manual pages in $(DESTDIR)$(MANDIR)/man1"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/arceus $(DESTDIR)$(MANDIR)/man1/arceus.1 $(DESTDIR)$(MANDIR)/man1/arceus-*.1

clean:
	rm -rf build bin

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d)
