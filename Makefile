# The README's two commands: `make demo` and `make test`. Everything they need is installed
# here (Debian packages with apt-get as root, Python packages in .venv), never by hand.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMPS := .stamps

# Debian packages: build tools, signing, readers used by the tests, wine, Redis.
DEBIAN_PACKAGES := wixl msitools osslsigncode nsis wine wine64 xorriso dmg2img p7zip-full \
	cpio libarchive-tools openssl softhsm2 libengine-pkcs11-openssl gcc-mingw-w64-x86-64 \
	make redis-server wrk

DEMO_OUT := out/demo
DEMO_KEYS := .dev-keys
SOURCE_DATE_EPOCH ?= 1767225600
export SOURCE_DATE_EPOCH

.PHONY: demo test bench deps venv payload payload-test payload-windows dev-keys clean

$(STAMPS)/debian:
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	@touch $@

deps: $(STAMPS)/debian $(STAMPS)/venv

venv: $(STAMPS)/venv

# The TEST payloads (payload/README.md): a tiny Windows service in C, cross-compiled with
# mingw-w64, and a macOS Agent.app around a hand-written universal Mach-O.
payload-test: $(STAMPS)/debian
	$(MAKE) -s -C payload/testagent
	python3 payload/testagent-macos/make_payload.py

# The reference agent, built by PyInstaller for this host (Windows and macOS binaries are
# built the same way on those systems).
payload: $(STAMPS)/venv
	$(PIP) install -q --disable-pip-version-check -e '.[payload]'
	.venv/bin/pyinstaller --noconfirm --log-level WARN payload/agent/agent.spec --distpath payload/build/host --workpath payload/build/pyi

# The reference agent for Windows, frozen by PyInstaller under wine from inputs pinned in
# payload/windows/inputs.lock (cached in ~/.cache/builder-payload; rebuilt when an input changes).
payload-windows: $(STAMPS)/debian $(STAMPS)/venv
	$(PY) payload/windows/build.py --out payload/build/reference/windows

dev-keys: $(STAMPS)/venv
	$(PY) -m builder dev-keys $(DEMO_KEYS)

# Enrollments are signed with the DEVELOPMENT enrollment key `builder dev-keys` makes; every
# installer pins its public key and the console host (builder/resources/defaults.toml).
DEMO_ENROLL = --enrollment-key $(DEMO_KEYS)/enrollment.key
DEMO_SIGN = --sign-cert $(DEMO_KEYS)/codesign.pem --sign-key $(DEMO_KEYS)/codesign.key --ca $(DEMO_KEYS)/ca.pem \
	--mac-sign-pkcs12 $(DEMO_KEYS)/mac-developer-id-application.p12 \
	--mac-sign-pkcs12 $(DEMO_KEYS)/mac-developer-id-installer.p12

demo: deps payload-test dev-keys
	@rm -rf $(DEMO_OUT)
	DEMO_TOKEN=demo-enrollment-token-$$(date +%s) BUILDER_MAC_SIGN_PASSWORD=development $(PY) -m builder build \
		--format msi --format exe --format pkg --format dmg \
		--version 1.0.0 --account-id demo-account --group-id demo-group \
		--token-env DEMO_TOKEN --console-url https://console.example.com \
		--payload payload/build --out $(DEMO_OUT) $(DEMO_SIGN) $(DEMO_ENROLL)
	$(PY) -m builder verify --ca $(DEMO_KEYS)/ca.pem $(DEMO_OUT)/*.msi $(DEMO_OUT)/*.exe $(DEMO_OUT)/*.pkg $(DEMO_OUT)/*.dmg
	@echo "== release: every format signed once, with an empty enrollment slot"
	BUILDER_MAC_SIGN_PASSWORD=development $(PY) -m builder release --version 1.0.0 --payload payload/build \
		--out $(DEMO_OUT)/release $(DEMO_SIGN) $(DEMO_ENROLL)
	@echo "== publish the release to the local store, then issue one group's installer the way the service does"
	$(PY) -m builder publish $(DEMO_OUT)/release --to file://$(CURDIR)/$(DEMO_OUT)/store
	@test -s $(DEMO_KEYS)/demo-link-key || $(PY) -c "import secrets; print(secrets.token_hex(32))" > $(DEMO_KEYS)/demo-link-key
	DEMO_TOKEN=demo-group-token-$$(date +%s) BUILDER_STORAGE_HMAC_KEY=$$(cat $(DEMO_KEYS)/demo-link-key) \
		$(PY) -m builder issue --format exe --account-id demo-account \
		--group-id demo-group-2 --token-env DEMO_TOKEN --storage file://$(CURDIR)/$(DEMO_OUT)/store \
		--state $(DEMO_OUT)/service-state --ca $(DEMO_KEYS)/ca.pem $(DEMO_ENROLL)
	@echo "== one generic MSI for every group: the console hands out a signed enrollment for msiexec"
	DEMO_TOKEN=demo-group-token-$$(date +%s) $(PY) -m builder enrollment --account-id demo-account \
		--group-id demo-group-3 --token-env DEMO_TOKEN --release $(DEMO_OUT)/release $(DEMO_ENROLL) --json \
		| $(PY) -c "import json, sys; d = json.load(sys.stdin); print('key', d['key_id'], 'signed enrollment of', len(d['enrollment']), 'characters: msiexec /i <release msi> ENROLLMENT=<it> /qn')"
	@echo "The link works once the service runs (README.md has the console's two curl calls):"
	@echo "  BUILDER_API_KEYS=demo:demo-api-key-0123456789 BUILDER_STORAGE_HMAC_KEY=\$$(cat $(DEMO_KEYS)/demo-link-key) \\"
	@echo "    .venv/bin/builder serve --port 8080 --storage file://$(CURDIR)/$(DEMO_OUT)/store --state $(DEMO_OUT)/service-state --ca $(DEMO_KEYS)/ca.pem $(DEMO_ENROLL)"

test: deps payload-test payload-windows
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: deps payload-test
	$(PY) -m tests.bench.run

clean:
	rm -rf out payload/build $(STAMPS) .pytest_cache
