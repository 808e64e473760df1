//! What the engine knows that does not change per decision: tiers, genres, GPU models and
//! which vGPU profile serves which tier on each model, interned to small indices.

use rustc_hash::FxHashMap;

use framecast_shared::genre::GenreProfile;
use framecast_shared::gpu::{GpuMode, GpuSpec, VgpuClass, VgpuProfile};
use framecast_shared::ids::{GameId, GenreName, RegionName, TierName};
use framecast_shared::tier::TierPreset;

/// Index of a tier in [`Catalog::tiers`], smallest framebuffer first, so "next tier up" is
/// `index + 1`.
pub type TierIdx = u8;
/// Index of a genre in [`Catalog::genres`].
pub type GenreIdx = u8;
/// Index of a GPU model in the catalog (see [`Catalog::spec`]).
pub type SpecIdx = u16;
/// Index of a region.
pub type RegionIdx = u16;
/// Index of a game.
pub type GameIdx = u32;
/// Index of a profile in a spec's `vgpu_profiles` (equal-size, mixed-size) or
/// `mig_profiles` (MIG).
pub type ProfileIdx = u8;

/// How sessions of one tier fit one GPU model, per mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierFit {
    /// Equal-size: the profile and how many instances a GPU of it holds.
    pub equal: Option<(ProfileIdx, u16)>,
    /// Mixed-size: the profile and its mixed-size instance limit.
    pub mixed: Option<(ProfileIdx, u16)>,
    /// MIG: the smallest instance shape that holds the tier.
    pub mig: Option<ProfileIdx>,
    /// Exclusive use: the whole GPU holds the tier.
    pub exclusive: bool,
}

/// The engine's interned vocabulary.
#[derive(Debug, Clone)]
pub struct Catalog {
    tiers: Vec<TierPreset>,
    genres: Vec<GenreProfile>,
    specs: Vec<GpuSpec>,
    /// `fits[spec][tier]`.
    fits: Vec<Vec<TierFit>>,
    regions: Vec<RegionName>,
    region_idx: FxHashMap<RegionName, RegionIdx>,
    games: Vec<GameId>,
    game_idx: FxHashMap<GameId, GameIdx>,
}

impl Catalog {
    /// A catalog of `tiers` (sorted here by framebuffer) and `genres`.
    pub fn new(mut tiers: Vec<TierPreset>, genres: Vec<GenreProfile>) -> Self {
        tiers.sort_by_key(|t| (t.framebuffer, t.resolution.pixels(), t.name.clone()));
        tiers.truncate(usize::from(TierIdx::MAX));
        let mut genres = genres;
        genres.truncate(usize::from(GenreIdx::MAX));
        Self {
            tiers,
            genres,
            specs: Vec::new(),
            fits: Vec::new(),
            regions: Vec::new(),
            region_idx: FxHashMap::default(),
            games: Vec::new(),
            game_idx: FxHashMap::default(),
        }
    }

    /// All tiers, smallest first.
    pub fn tiers(&self) -> &[TierPreset] {
        &self.tiers
    }

    /// One tier.
    pub fn tier(&self, idx: TierIdx) -> Option<&TierPreset> {
        self.tiers.get(usize::from(idx))
    }

    /// The index of the tier named `name`.
    pub fn tier_idx(&self, name: &TierName) -> Option<TierIdx> {
        self.tiers
            .iter()
            .position(|t| &t.name == name)
            .and_then(|i| TierIdx::try_from(i).ok())
    }

    /// All genres.
    pub fn genres(&self) -> &[GenreProfile] {
        &self.genres
    }

    /// One genre.
    pub fn genre(&self, idx: GenreIdx) -> Option<&GenreProfile> {
        self.genres.get(usize::from(idx))
    }

    /// The index of the genre named `name`.
    pub fn genre_idx(&self, name: &GenreName) -> Option<GenreIdx> {
        self.genres
            .iter()
            .position(|g| &g.name == name)
            .and_then(|i| GenreIdx::try_from(i).ok())
    }

    /// One GPU model.
    pub fn spec(&self, idx: SpecIdx) -> Option<&GpuSpec> {
        self.specs.get(usize::from(idx))
    }

    /// The index of `spec`, adding it on first sight. Nodes report their GPUs' specs; equal
    /// specs share one index.
    pub fn intern_spec(&mut self, spec: &GpuSpec) -> Option<SpecIdx> {
        if let Some(i) = self.specs.iter().position(|s| s == spec) {
            return SpecIdx::try_from(i).ok();
        }
        let idx = SpecIdx::try_from(self.specs.len()).ok()?;
        let fits = self.tiers.iter().map(|t| fit(spec, t)).collect();
        self.specs.push(spec.clone());
        self.fits.push(fits);
        Some(idx)
    }

    /// How `tier` fits GPU model `spec`.
    pub fn fit(&self, spec: SpecIdx, tier: TierIdx) -> TierFit {
        self.fits
            .get(usize::from(spec))
            .and_then(|f| f.get(usize::from(tier)))
            .copied()
            .unwrap_or_default()
    }

    /// A profile of a spec in a mode.
    pub fn profile(&self, spec: SpecIdx, mode: GpuMode, idx: ProfileIdx) -> Option<&VgpuProfile> {
        self.spec(spec)?.profiles(mode).get(usize::from(idx))
    }

    /// The index of `region`, adding it on first sight.
    pub fn intern_region(&mut self, region: &RegionName) -> Option<RegionIdx> {
        if let Some(&i) = self.region_idx.get(region) {
            return Some(i);
        }
        let idx = RegionIdx::try_from(self.regions.len()).ok()?;
        self.regions.push(region.clone());
        self.region_idx.insert(region.clone(), idx);
        Some(idx)
    }

    /// The index of a known region.
    pub fn region_idx(&self, region: &RegionName) -> Option<RegionIdx> {
        self.region_idx.get(region).copied()
    }

    /// A region's name.
    pub fn region(&self, idx: RegionIdx) -> Option<&RegionName> {
        self.regions.get(usize::from(idx))
    }

    /// The index of `game`, adding it on first sight.
    pub fn intern_game(&mut self, game: &GameId) -> Option<GameIdx> {
        if let Some(&i) = self.game_idx.get(game) {
            return Some(i);
        }
        let idx = GameIdx::try_from(self.games.len()).ok()?;
        self.games.push(game.clone());
        self.game_idx.insert(game.clone(), idx);
        Some(idx)
    }

    /// The index of a known game.
    pub fn game_idx(&self, game: &GameId) -> Option<GameIdx> {
        self.game_idx.get(game).copied()
    }

    /// A game's id.
    pub fn game(&self, idx: GameIdx) -> Option<&GameId> {
        self.games.get(usize::try_from(idx).ok()?)
    }
}

fn fit(spec: &GpuSpec, tier: &TierPreset) -> TierFit {
    if !spec.can_stream() {
        return TierFit::default();
    }
    let vw = VgpuClass::VirtualWorkstation;
    let index_of = |mode: GpuMode, p: &VgpuProfile| {
        spec.profiles(mode)
            .iter()
            .position(|q| q == p)
            .and_then(|i| ProfileIdx::try_from(i).ok())
    };
    let equal = spec
        .smallest_profile_for(GpuMode::EqualSize, vw, tier.framebuffer)
        .and_then(|p| {
            Some((
                index_of(GpuMode::EqualSize, p)?,
                p.max_instances.min(spec.max_vgpus),
            ))
        });
    let mixed = spec
        .smallest_profile_for(GpuMode::MixedSize, vw, tier.framebuffer)
        .and_then(|p| {
            Some((
                index_of(GpuMode::MixedSize, p)?,
                p.max_instances_mixed?.min(spec.max_vgpus),
            ))
        });
    // MIG shapes are compute-class; a MIG GPU that can stream (one with NVENC) serves a tier
    // from the smallest shape with enough memory.
    let mig = spec
        .profiles(GpuMode::Mig)
        .iter()
        .filter(|p| p.framebuffer >= tier.framebuffer)
        .min_by_key(|p| p.framebuffer)
        .and_then(|p| index_of(GpuMode::Mig, p));
    TierFit {
        equal,
        mixed,
        mig,
        exclusive: spec.supports(GpuMode::Exclusive)
            && tier.framebuffer.megabytes() <= spec.framebuffer,
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::gpu::models;

    use super::*;

    #[test]
    fn tiers_map_to_the_smallest_fitting_profile() {
        let mut c = Catalog::new(TierPreset::defaults(), GenreProfile::defaults());
        let l4 = c.intern_spec(&models::l4()).unwrap();
        assert_eq!(
            c.intern_spec(&models::l4()),
            Some(l4),
            "equal specs share an index"
        );
        let names: Vec<(String, u16)> = (0..3)
            .map(|t| {
                let (p, slots) = c.fit(l4, t).equal.unwrap();
                (
                    c.profile(l4, GpuMode::EqualSize, p).unwrap().id.clone(),
                    slots,
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("L4-2Q".into(), 12),
                ("L4-4Q".into(), 6),
                ("L4-8Q".into(), 3)
            ]
        );
        assert_eq!(c.fit(l4, 0).mixed.map(|(_, n)| n), Some(8));
        let h100 = c
            .intern_spec(&models::h100_80gb("NVIDIA H100 PCIe"))
            .unwrap();
        assert_eq!(c.fit(h100, 0), TierFit::default(), "no NVENC, no fit");
        let rtx = c.intern_spec(&models::rtx_4090()).unwrap();
        assert_eq!(
            c.fit(rtx, 2),
            TierFit {
                exclusive: true,
                ..TierFit::default()
            }
        );
    }
}
