#!/usr/bin/env python3
# Greedy feature cover (see docs/fuzzing.md): keep at most N files of a merged corpus, most new features first.
# Reads a libFuzzer merge control file (from -merge_control_file) of a merge over the corpus.
# Files of an optional FORCED directory (an edge cover) are kept first.
# Usage: greedy_cover.py MERGE_CONTROL_FILE OUT_DIR N [FORCED_DIR]
import sys, os, shutil
mcf, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
forced = set(os.listdir(sys.argv[4])) if len(sys.argv) > 4 else set()
lines = open(mcf).read().split('\n')
nfiles = int(lines[0]); files = lines[2:2 + nfiles]
sets = {}
for line in lines[2 + nfiles:]:
    p = line.split()
    if p and p[0] in ('FT', 'COV'):
        sets.setdefault(int(p[1]), set()).update(x if p[0] == 'COV' else 'f' + x for x in p[2:])
total = set().union(*sets.values())
covered, chosen = set(), []
for i in list(sets):
    if os.path.basename(files[i]) in forced:
        chosen.append(i); covered |= sets.pop(i)
while len(chosen) < n and sets:
    best = max(sets, key=lambda i: (len(sets[i] - covered), -os.path.getsize(files[i])))
    if not sets[best] - covered: break
    chosen.append(best); covered |= sets.pop(best)
os.makedirs(dst, exist_ok=True)
for i in chosen: shutil.copy(files[i], dst)
print(f'{len(chosen)} files keep {len(covered)}/{len(total)} features ({100*len(covered)/len(total):.1f}%)')
