#!/usr/bin/env bash
# Builds Weft's packages from ONE release build of the binary:
#   target/packaging/out/weft_<version>-1_<arch>.deb          (cargo-deb --no-build)
#   target/packaging/out/upgrade/weft_<version>-2_<arch>.deb  (same binary, next revision: the
#                                                             newer package of upgrade tests)
#   target/packaging/out/weft-<version>-1.<arch>.rpm          (cargo-generate-rpm)
# The man page, shell completions, changelog and license that the packages carry are
# generated into target/packaging/gen first. Version: the workspace version.
# Needs cargo-deb and cargo-generate-rpm (.ci/run installs them).
# WEFT_PACKAGE_PREBUILT=1 skips the release build and packages target/release/weft as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."

phase() { printf '%s: %s (%ss)\n' "packaging" "$1" "$(( $(date +%s) - $2 ))"; }

# WEFT_PACKAGE_PREBUILT=1 packages the binary already in target/release as it is.
if [[ "${WEFT_PACKAGE_PREBUILT:-}" != 1 ]]; then
  t=$(date +%s)
  cargo build --release --locked --bin weft
  phase "release build" "$t"
fi

for tool in cargo-deb cargo-generate-rpm; do
  command -v "$tool" >/dev/null || {
    echo "build.sh: $tool is missing: cargo install --locked $tool (.ci/run does this)" >&2
    exit 1
  }
done

bin=target/release/weft
version=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "weft"))')
gen=target/packaging/gen
rm -rf "$gen"
mkdir -p "$gen"
"$bin" man | gzip -9n >"$gen/weft.1.gz"
"$bin" completions bash >"$gen/weft.bash"
"$bin" completions zsh >"$gen/_weft"
"$bin" completions fish >"$gen/weft.fish"
cp /usr/share/common-licenses/Apache-2.0 "$gen/LICENSE"

changelog() { # VERSION: a Debian changelog naming this build
  cat <<CL
weft ($1) unstable; urgency=medium

  * Release $1, built from the Weft workspace (version $version).

 -- Weft maintainers <weft@example.invalid>  $(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")
CL
}

out=target/packaging/out
rm -rf "$out"
mkdir -p "$out/upgrade"

# cargo-deb takes the Debian synopsis from the crate description, and "Weft service mesh
# agent and CLI" starts with the package name, which lintian counts as an error
# (description-starts-with-package-name). Rewrite that one control line with dpkg-deb; as the
# package is compressed once more there, cargo-deb compresses fast (--fast) and dpkg-deb -z3.
synopsis="service mesh agent and CLI for VMs and bare-metal hosts"
fix_synopsis() { # DEB
  local work
  work=$(mktemp -d)
  dpkg-deb -R "$1" "$work/pkg"
  sed -i "s/^Description: .*/Description: $synopsis/" "$work/pkg/DEBIAN/control"
  dpkg-deb --root-owner-group -Zxz -z3 -b "$work/pkg" "$1" >/dev/null
  rm -rf "$work"
}

t=$(date +%s)
changelog "$version-1" >"$gen/changelog"
cargo deb -p weft --no-build --locked --fast --deb-revision 1 -o "$out/" >/dev/null
# The next revision of the same binary, for upgrade tests.
changelog "$version-2" >"$gen/changelog"
cargo deb -p weft --no-build --locked --fast --deb-revision 2 -o "$out/upgrade/" >/dev/null
for deb in "$out"/*.deb "$out"/upgrade/*.deb; do fix_synopsis "$deb"; done
changelog "$version-1" >"$gen/changelog"
phase "cargo deb (2 packages)" "$t"

# RPMs are signed. A release signs with the project's key (WEFT_RPM_SIGNING_KEY: an
# armored OpenPGP secret key without passphrase, and WEFT_RPM_SIGNING_PUBKEY beside it);
# without one, a throwaway ed25519 key is made for this build, and its public half is
# written next to the package (RPM-GPG-KEY-weft) so tests can verify the signature.
t=$(date +%s)
key=${WEFT_RPM_SIGNING_KEY:-}
if [[ -z "$key" ]]; then
  command -v gpg >/dev/null || { echo "build.sh: gpg is missing (apt-get install -y gnupg)" >&2; exit 1; }
  gnupg=$(mktemp -d)
  GNUPGHOME=$gnupg gpg --batch --quiet --pinentry-mode loopback --passphrase '' \
    --quick-gen-key "Weft package signing, throwaway build key <weft@example.invalid>" ed25519 sign 1d 2>/dev/null
  GNUPGHOME=$gnupg gpg --batch --armor --export-secret-keys >"$gen/signing-key.asc"
  GNUPGHOME=$gnupg gpg --batch --armor --export >"$out/RPM-GPG-KEY-weft"
  gpgconf --homedir "$gnupg" --kill all 2>/dev/null || true
  rm -rf "$gnupg"
  key=$gen/signing-key.asc
else
  cp "${WEFT_RPM_SIGNING_PUBKEY:?set WEFT_RPM_SIGNING_PUBKEY with WEFT_RPM_SIGNING_KEY}" "$out/RPM-GPG-KEY-weft"
fi
cargo generate-rpm -p node -o "$out/" --signing-key "$key"
rm -f "$gen/signing-key.asc"
phase "cargo generate-rpm (signed)" "$t"

ls -l "$out"/*.deb "$out"/upgrade/*.deb "$out"/*.rpm
