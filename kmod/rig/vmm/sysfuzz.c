// SPDX-License-Identifier: GPL-2.0
/*
 * sysfuzz: write random, malformed and oversized values to one sysfs file
 * and check that every write fails with EINVAL.
 *
 *   sysfuzz [-l] FILE COUNT SEED VALID...
 *
 * VALID are the values the file accepts. Strict (default, sysfs ABI v1):
 * only a VALID value, with or without one trailing newline, is valid, so
 * every other generated input is written and must fail. -l (lenient, for
 * module parameters, whose set() sees a C string and no length): inputs
 * that could be read as a VALID value (same token up to the first NUL,
 * after trimming white space, ignoring case, or a number equal to a
 * numeric VALID) are not written.
 * Prints one line per unexpected result and a summary; exits 1 on any.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static char **valid;
static int nvalid;
static unsigned long long rng;

static unsigned rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (unsigned)(rng >> 11);
}

static int lenient;

static int ambiguous(const char *buf, size_t len)
{
	char t[256];
	size_t a = 0, b;
	char *end;

	if (!lenient) {
		for (int i = 0; i < nvalid; i++) {
			size_t vl = strlen(valid[i]);

			if ((len == vl || (len == vl + 1 && buf[vl] == '\n')) &&
			    !memcmp(buf, valid[i], vl))
				return 1;
		}
		return 0;
	}
	b = strnlen(buf, len); /* the kernel side sees a C string */
	while (a < b && isspace((unsigned char)buf[a]))
		a++;
	while (b > a && isspace((unsigned char)buf[b - 1]))
		b--;
	if (b - a >= sizeof(t))
		return 0;
	memcpy(t, buf + a, b - a);
	t[b - a] = 0;
	for (int i = 0; i < nvalid; i++) {
		long v, w;

		if (!strcasecmp(t, valid[i]))
			return 1;
		w = strtol(valid[i], &end, 0);
		if (*end || !*valid[i])
			continue;
		v = strtol(t, &end, 0);
		if (*t && !*end && v == w)
			return 1;
	}
	return 0;
}

static const char *junk[] = { "", " ", "x", "\n\n", "-", "0", "2", "-1", "\t",
	"99999999999999999999", "%s%n", "\xff\xfe", "../", "1 1", ",", ";" };

static size_t gen(char *buf, size_t cap)
{
	size_t len = 0;
	unsigned kind = rnd() % 7;

	switch (kind) {
	case 0: /* random printable */
		len = 1 + rnd() % 64;
		for (size_t i = 0; i < len; i++)
			buf[i] = (char)(33 + rnd() % 94);
		break;
	case 1: /* random binary */
		len = 1 + rnd() % 64;
		for (size_t i = 0; i < len; i++)
			buf[i] = (char)rnd();
		break;
	case 2: /* oversized: bigger than a page */
		len = 4096 + rnd() % (cap - 4096);
		for (size_t i = 0; i < len; i++)
			buf[i] = (char)(33 + rnd() % 94);
		if (rnd() % 2) { /* a valid token followed by a huge tail */
			const char *v = valid[rnd() % nvalid];

			memcpy(buf, v, strlen(v));
		}
		break;
	case 6: { /* a valid token, a NUL, junk */
		const char *v = valid[rnd() % nvalid];
		size_t vl = strlen(v);

		memcpy(buf, v, vl);
		buf[vl] = 0;
		len = vl + 1 + rnd() % 8;
		for (size_t i = vl + 1; i < len; i++)
			buf[i] = (char)(33 + rnd() % 94);
		break;
	}
	default: { /* a valid token with junk around or inside it */
		const char *v = valid[rnd() % nvalid];
		const char *pre = junk[rnd() % 16], *suf = junk[rnd() % 16];
		size_t vl = strlen(v);
		char tok[128];

		memcpy(tok, v, vl + 1);
		if (kind == 3 && vl) /* mutate one byte */
			tok[rnd() % vl] = (char)(33 + rnd() % 94);
		if (kind == 4 && vl > 1) /* truncate */
			tok[1 + rnd() % (vl - 1)] = 0;
		len = (size_t)snprintf(buf, cap, "%s%s%s", pre, tok, suf);
		if (!len) {
			buf[0] = '?';
			len = 1;
		}
		break;
	}
	}
	return len;
}

int main(int argc, char **argv)
{
	static char buf[65536];
	unsigned long count, written = 0, bad = 0, skipped = 0;
	const char *path;

	if (argc > 1 && !strcmp(argv[1], "-l")) {
		lenient = 1;
		argv++;
		argc--;
	}
	if (argc < 5) {
		fprintf(stderr, "usage: sysfuzz [-l] FILE COUNT SEED VALID...\n");
		return 2;
	}
	path = argv[1];
	count = strtoul(argv[2], NULL, 10);
	rng = strtoull(argv[3], NULL, 10) * 2654435761ULL + 88172645463325252ULL;
	valid = argv + 4;
	nvalid = argc - 4;
	while (written < count) {
		size_t len = gen(buf, sizeof(buf));
		int fd;
		ssize_t r;

		if (ambiguous(buf, len)) {
			skipped++;
			continue;
		}
		fd = open(path, O_WRONLY);
		if (fd < 0) {
			printf("sysfuzz: open %s: %s\n", path, strerror(errno));
			return 1;
		}
		r = write(fd, buf, len);
		if (r >= 0 || errno != EINVAL) {
			int e = errno;

			bad++;
			if (bad <= 10) {
				printf("sysfuzz: %s: write of %zu bytes \"", path, len);
				for (size_t i = 0; i < len && i < 40; i++)
					printf(isprint((unsigned char)buf[i]) && buf[i] != '"'
					       ? "%c" : "\\x%02x", (unsigned char)buf[i]);
				printf("%s\" -> %s\n", len > 40 ? "..." : "",
				       r >= 0 ? "accepted" : strerror(e));
			}
		}
		close(fd);
		written++;
	}
	printf("sysfuzz: %s: %lu writes, %lu not EINVAL, %lu skipped as valid\n",
	       path, written, bad, skipped);
	return bad ? 1 : 0;
}
