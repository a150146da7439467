// Types for bastion-recovery (docs/recovery.md).
import type Pusher from 'pusher-js';

/** What a channel's `bastion:recovery` handlers receive. */
export interface Recovery {
  /** Every missed event was replayed, in order (false: nothing was; refetch). */
  recovered: boolean;
  /** Where the channel is now; absent when it has no history. */
  position?: string;
  /** How many events were replayed (when recovered). */
  replayed?: number;
  /** Why recovery was not possible (when not recovered). */
  reason?: string;
}

/** Makes `pusher`'s channels resume after every reconnect; returns the same instance. */
export function withRecovery<T extends Pusher>(pusher: T): T;
