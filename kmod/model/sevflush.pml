/*
 * SPDX-License-Identifier: GPL-2.0
 *
 * Spin model of the sevflush clear-on-flush protocol (sevflush_core.c),
 * for one VM: NCPU physical CPUs, NVCPU vCPUs that migrate freely between
 * them, NFL flushers that run concurrently.
 *
 * vCPU (on a free CPU c, IRQs off until it leaves c):
 *   probe: if the per-CPU cache says "marked", skip; else test the dirty
 *          bit, set it if clear, then fill the cache (separate steps, as
 *          in sf_enter_slow());
 *   guest: any number of steps; each may write lines of every page the
 *          guest can still access.
 * Flusher f, in a loop:
 *   a page is mapped; later the guest loses access to it (reclaim point);
 *   lock (unless NOSERIAL); snapshot-and-clear the dirty set (one atomic
 *   step: the xchg of one word); one IPI per snapshot CPU; wait for all;
 *   unlock; assert no CPU still holds lines of the page.
 * IPI handler on CPU c: runs only while no vCPU is in guest on c (IRQs
 *   on); writes back c's caches and resets c's cache (unless NORESET).
 *
 * Safety: when a flusher returns, no CPU holds lines of the page it
 * reclaimed. `spin -a sevflush.pml && gcc -o pan pan.c && ./pan` finds no
 * error; `spin -DNOSERIAL -a ...` (flushers not serialized) and
 * `spin -DNORESET -a ...` (no cache reset in the IPI handler) find a
 * violation. check.sh runs all three.
 */

#define NCPU	3
#define NVCPU	2
#define NFL	2

bit dirty[NCPU];		/* the VM's dirty set */
bit cache[NCPU];		/* per-CPU "already marked" cache */
bit busy[NCPU];			/* a vCPU is in the guest on this CPU */
bit accessible[NFL];		/* the guest can touch flusher f's page */
bit lock;			/* the VM's flush lock */

typedef row { bit c[NCPU] };
row lines[NFL];			/* CPU c may hold lines of f's page */
row req[NFL];			/* flush IPI from f pending on CPU c */
row snap[NFL];			/* f's snapshot */

proctype vcpu()
{
	byte c, f;

	do
	:: atomic {
		if
		:: !busy[0] -> c = 0
		:: !busy[1] -> c = 1
		:: !busy[2] -> c = 2
		fi;
		busy[c] = 1
	   };
	   /* probe */
	   if
	   :: cache[c] -> skip
	   :: else ->
		if
		:: dirty[c] -> skip
		:: else -> dirty[c] = 1
		fi;
		cache[c] = 1
	   fi;
	   /* guest */
	   do
	   :: atomic {
		for (f : 0 .. NFL - 1) {
			if
			:: accessible[f] -> lines[f].c[c] = 1
			:: else -> skip
			fi
		};
		f = 0
	      }
	   :: break
	   od;
	   atomic { busy[c] = 0; c = 0 }
	od
}

proctype ipi_handler(byte c)
{
	byte f, g;

	do
	:: atomic {
		!busy[c] && (req[0].c[c] || req[1].c[c]) ->
		if
		:: req[0].c[c] -> f = 0
		:: req[1].c[c] -> f = 1
		fi;
#ifndef NORESET
		cache[c] = 0;
#endif
		for (g : 0 .. NFL - 1) {
			lines[g].c[c] = 0
		};
		req[f].c[c] = 0;
		f = 0;
		g = 0
	   }
	od
}

proctype flusher(byte f)
{
	byte c;

	do
	:: atomic {
		for (c : 0 .. NCPU - 1) {
			assert(lines[f].c[c] == 0)
		};
		accessible[f] = 1;
		c = 0
	   };
	   /* reclaim point: the guest loses access to the page */
	   accessible[f] = 0;
#ifndef NOSERIAL
	   atomic { lock == 0 -> lock = 1 };
#endif
	   atomic {
		for (c : 0 .. NCPU - 1) {
			snap[f].c[c] = dirty[c];
			dirty[c] = 0
		};
		c = 0
	   };
	   atomic {
		for (c : 0 .. NCPU - 1) {
			if
			:: snap[f].c[c] -> req[f].c[c] = 1
			:: else -> skip
			fi;
			snap[f].c[c] = 0
		};
		c = 0
	   };
	   (req[f].c[0] == 0 && req[f].c[1] == 0 && req[f].c[2] == 0);
#ifndef NOSERIAL
	   lock = 0;
#endif
	   /* the flusher returns: safety */
	   atomic {
		for (c : 0 .. NCPU - 1) {
			assert(lines[f].c[c] == 0)
		};
		c = 0
	   }
	od
}

init
{
	atomic {
		run vcpu();
		run vcpu();
		run ipi_handler(0);
		run ipi_handler(1);
		run ipi_handler(2);
		run flusher(0);
		run flusher(1)
	}
}
